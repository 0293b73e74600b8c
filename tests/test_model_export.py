"""What a trained model looks like to the tools users already have: stock tiling, file permissions,
the model card and the Hub upload."""

import os
import stat

import numpy as np
import pytest
import torch
from conftest import fast_config, reset_accelerate
from diffusers import AutoencoderKL

from latent_vae.data.sources import sample_photo_sources
from latent_vae.interop.single_file import export_single_file
from latent_vae.runtime import DIR_MODE, FILE_MODE
from latent_vae.train.loop import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """tiny-kl briefly trained on real photos at 32 px (~10 s on 2 idle CPU cores), one checkpoint on the way."""
    out = tmp_path_factory.mktemp("run")
    train(fast_config("train.max_steps=120", "train.learning_rate=2e-4", "train.checkpoint_every=60"), out)
    reset_accelerate()
    return out


def photo(width: int, height: int) -> torch.Tensor:
    source, _ = sample_photo_sources()
    image = source.read(0).convert("RGB").resize((width, height))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / (a - b).pow(2).mean().clamp_min(1e-20)))


@torch.no_grad()
def stock_tiled_psnr(vae: AutoencoderKL, image: torch.Tensor) -> float:
    """Stock ``enable_tiling()`` decode against untiled decode of the same latents."""
    latents = vae.encode(image).latent_dist.mode()
    whole = vae.decode(latents).sample
    vae.enable_tiling()
    tiled = vae.decode(latents).sample
    vae.disable_tiling()
    return psnr(tiled, whole)


def test_stock_tiling_of_an_exported_model_matches_untiled_decoding(trained_run):
    """The exported sample_size is 512 (the training resolution, 32, is smaller): stock tiling leaves
    a 256² image whole, and tiles a 640×256 one at 512 px. Threshold 30 dB: 25% overlap blending hides
    the seams; what remains is GroupNorm taking its statistics per tile (diffusers' tiling by design),
    a colour difference below what the eye sees. diffusers' default sample_size, 32, gave 20-25 dB."""
    vae = AutoencoderKL.from_pretrained(trained_run / "model").eval()
    assert vae.config.sample_size == 512
    assert stock_tiled_psnr(vae, photo(256, 256)) > 60  # not tiled at all: identical
    wide = photo(640, 256)
    tiled_psnr = stock_tiled_psnr(vae, wide)
    old = AutoencoderKL.from_config({**vae.config, "sample_size": 32})
    old.load_state_dict(vae.state_dict())
    old_psnr = stock_tiled_psnr(old.eval(), wide)
    print(f"stock tiling vs untiled at 640x256: {tiled_psnr:.1f} dB (sample_size 32: {old_psnr:.1f} dB)")
    assert tiled_psnr >= 30 and old_psnr < 28


def test_model_folder_single_file_and_checkpoints_get_ordinary_permissions(trained_run, tmp_path):
    """safetensors writes 0600: a WebUI service, another user or a team share could not read the weights."""
    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    written = [p for folder in (trained_run / "model", trained_run / "checkpoints") for p in folder.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in written if "checkpoints" in p.parts)
    assert any(p.name.endswith(".safetensors") for p in (trained_run / "model").iterdir())
    assert {oct(mode(p)) for p in written if p.is_file()} == {oct(FILE_MODE)}
    assert {oct(mode(p)) for p in written if p.is_dir()} | {oct(mode(trained_run / "model"))} == {oct(DIR_MODE)}
    single = export_single_file(AutoencoderKL.from_pretrained(trained_run / "model"), tmp_path / "vae.safetensors")
    assert mode(single) == FILE_MODE
