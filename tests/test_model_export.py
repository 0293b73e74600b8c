"""What a trained model looks like to the tools users already have: stock tiling, file permissions,
the model card and the Hub upload."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import fast_config, reset_accelerate
from diffusers import AutoencoderKL

from latent_vae.cli import main
from latent_vae.config import config_to_dict, load_config
from latent_vae.data.sources import sample_photo_sources
from latent_vae.errors import ConfigError
from latent_vae.interop.export import write_model_card
from latent_vae.interop.single_file import export_single_file
from latent_vae.presets import PRESETS
from latent_vae.runtime import DIR_MODE, FILE_MODE
from latent_vae.train.loop import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """tiny-kl briefly trained on real photos at 32 px, GAN from step 60 (~10 s on 2 idle CPU cores), one checkpoint
    on the way."""
    out = tmp_path_factory.mktemp("run")
    train(fast_config("train.max_steps=120", "train.learning_rate=2e-4", "train.checkpoint_every=60",
                      "gan.start=60"), out)
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


class FakeHub:
    """``huggingface_hub.HfApi`` without a network: records what would go up, and the card as uploaded."""

    logged_in = True
    calls: list = []

    def whoami(self):
        if not self.logged_in:
            from huggingface_hub.errors import LocalTokenNotFoundError

            raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
        return {"name": "me"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        card = (Path(folder_path) / "README.md").read_text()
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, folder_path, files, card))

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        self.calls.append(("upload_file", repo_id, path_in_repo))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.logged_in = [], True
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_pushes_the_folder_its_card_and_the_single_file(trained_run, tmp_path, fake_hub, capsys):
    single = tmp_path / "vae.safetensors"
    assert main(["export", "--model", str(trained_run / "model"), "--output", str(single),
                 "--push-to-hub", "me/my-vae"]) == 0
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds == ["create_repo", "upload_folder", "upload_file"]
    _, repo, folder, files, card = fake_hub.calls[1]
    assert repo == "me/my-vae" and Path(folder) == trained_run / "model"
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    assert fake_hub.calls[2] == ("upload_file", "me/my-vae", "vae.safetensors")
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["license"] == "other"
    assert {"diffusers", "AutoencoderKL", "vae"} <= set(meta["tags"]) and "base_model" not in meta
    assert 'AutoencoderKL.from_pretrained("me/my-vae")' in card
    assert "- perceptual loss: off" in card and "- GAN: PatchGAN" in card and "- KL weight 1e-06" in card
    assert str(trained_run) not in card and str(tmp_path) not in card  # no local paths on the Hub
    assert "me/my-vae" in capsys.readouterr().out


def test_push_without_a_login_is_one_line_before_anything_is_written(trained_run, tmp_path, fake_hub, capsys):
    fake_hub.logged_in = False
    single = tmp_path / "vae.safetensors"
    assert main(["export", "--model", str(trained_run / "model"), "--output", str(single),
                 "--push-to-hub", "me/my-vae"]) == 2
    err = capsys.readouterr().err
    assert "hf auth login" in err and "HF_TOKEN" in err and len(err.strip().splitlines()) == 1
    assert not single.exists() and fake_hub.calls == []
    assert main(["export", "--model", str(trained_run / "model"), "--push-to-hub", "not-a-repo-id"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err


def test_train_pushes_its_export_and_stops_early_without_a_login(tmp_path, fake_hub):
    train(fast_config("train.max_steps=2", "export.push_to_hub=me/tiny"), tmp_path / "run")
    reset_accelerate()
    (_, repo, folder, _, card), = [c for c in fake_hub.calls if c[0] == "upload_folder"]
    assert repo == "me/tiny" and Path(folder) == tmp_path / "run" / "model"
    assert 'from_pretrained("me/tiny")' in card
    fake_hub.logged_in = False
    with pytest.raises(ConfigError, match="hf auth login"):
        train(fast_config("train.max_steps=2", "export.push_to_hub=me/tiny"), tmp_path / "run2")
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_a_fine_tune_card_names_its_base_model_true_architecture_and_losses(tmp_path):
    """Not the default preset's name: the widths of the model that was trained, and its Hub base model."""
    model = AutoencoderKL(**{**PRESETS["tiny-kl"].kwargs, "block_out_channels": (32, 64, 64, 64)})
    recipe = config_to_dict(load_config("sd-vae-ft-mse", ["model.pretrained=stabilityai/sd-vae-ft-mse",
                                                          "data.path=my-org/my-photos", "export.license=mit"]))
    write_model_card(tmp_path, model, recipe, 1000, {"psnr": 31.5})
    card = (tmp_path / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "stabilityai/sd-vae-ft-mse" and meta["datasets"] == ["my-org/my-photos"]
    assert meta["license"] == "mit"
    assert "block_out_channels [32, 64, 64, 64]" in card and "preset" not in card
    assert "fine-tuned from `stabilityai/sd-vae-ft-mse`" in card and "| psnr | 31.5000 |" in card
    assert "- perceptual loss: LPIPS-vgg" in card and "- GAN: off" in card
    local = config_to_dict(load_config("sd-vae-ft-mse", [f"model.pretrained={tmp_path}/base_vae",
                                                         f"data.path={tmp_path}"]))
    (tmp_path / "base_vae").mkdir()
    write_model_card(tmp_path, model, local, 10, {})
    card = (tmp_path / "README.md").read_text()
    assert str(tmp_path) not in card and "`base_vae`" in card and "base_model" not in front_matter(card)
