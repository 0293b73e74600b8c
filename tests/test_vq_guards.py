"""KL-only operations refuse a VQModel in one line instead of doing something silently wrong."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from latent_vae.cli import main
from latent_vae.config import load_config
from latent_vae.encode.run import encode_dataset
from latent_vae.errors import ConfigError
from latent_vae.models.loading import build_autoencoder
from latent_vae.presets import PRESETS


@pytest.fixture
def vq_dir(tmp_path):
    torch.manual_seed(0)
    VQModel(**PRESETS["tiny-vq"].kwargs).save_pretrained(tmp_path / "vq")
    return tmp_path / "vq"


def test_per_channel_stats_are_refused_for_a_vq_model_before_the_pass(vq_dir, photo_folder, tmp_path, capsys):
    """A VQModel's config has no latents_mean/latents_std: writing the global factor instead was silent."""
    before = (vq_dir / "config.json").read_text()
    assert main(["stats", "--latents", str(tmp_path / "not-encoded-yet"), "--write-to", str(vq_dir),
                 "--fields", "per-channel"]) == 2  # refused before the latents are even read
    assert "is a VQModel" in capsys.readouterr().err and (vq_dir / "config.json").read_text() == before
    encode_dataset(str(vq_dir), str(photo_folder), tmp_path / "latents", resolution=32, num_workers=0, progress=False)
    capsys.readouterr()
    assert main(["stats", "--latents", str(tmp_path / "latents"), "--write-to", str(vq_dir),
                 "--fields", "per-channel"]) == 2
    err = capsys.readouterr().err
    assert "--fields per-channel" in err and "use --fields global" in err and len(err.strip().splitlines()) == 1
    assert (vq_dir / "config.json").read_text() == before
    assert main(["stats", "--latents", str(tmp_path / "latents"), "--write-to", str(vq_dir)]) == 0
    config = json.loads((vq_dir / "config.json").read_text())
    assert config["scaling_factor"] != 1.0 and "latents_mean" not in config and "shift_factor" not in config


def test_sd_decoder_fine_tune_recipes_refuse_a_vq_model(vq_dir, tmp_path):
    for recipe in ("sd-vae-ft-mse", "sd-vae-ft-ema"):
        # regularizer.kind=vq is what the generic KL/VQ mismatch message would have told the user to set
        cfg = load_config(recipe, [f"model.pretrained={vq_dir}", "model.subfolder=null", "regularizer.kind=vq"])
        with pytest.raises(ConfigError, match="is a VQModel, but this recipe fine-tunes an AutoencoderKL"):
            build_autoencoder(cfg.model)
    AutoencoderKL(**PRESETS["tiny-kl"].kwargs).save_pretrained(tmp_path / "kl")
    cfg = load_config("sd-vae-ft-mse", [f"model.pretrained={tmp_path / 'kl'}", "model.subfolder=null"])
    assert isinstance(build_autoencoder(cfg.model), AutoencoderKL)
