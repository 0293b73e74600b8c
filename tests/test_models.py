"""Presets are the stock diffusers classes; existing VAEs load from folders (safetensors only)."""

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from latent_vae.config import ModelConfig
from latent_vae.errors import ConfigError
from latent_vae.models.loading import build_autoencoder, load_autoencoder
from latent_vae.models.stock import count_parameters, downsample_factor, latent_channels, reconstruct
from latent_vae.presets import PRESETS


def test_kl_f8_is_the_stable_diffusion_architecture():
    model = build_autoencoder(ModelConfig(preset="kl-f8"))
    assert type(model) is AutoencoderKL
    assert tuple(model.config.block_out_channels) == (128, 256, 512, 512)
    assert model.config.layers_per_block == 2 and model.config.latent_channels == 4
    assert model.config.scaling_factor == pytest.approx(0.18215)
    assert count_parameters(model) == 83_653_863  # the SD 1.x VAE's parameter count


@pytest.mark.parametrize("name, cls, factor, channels", [
    ("kl-f8-c16", AutoencoderKL, 8, 16), ("kl-f4", AutoencoderKL, 4, 3), ("kl-f16", AutoencoderKL, 16, 16),
    ("tiny-kl", AutoencoderKL, 8, 4), ("vq-f4", VQModel, 4, 3), ("vq-f8", VQModel, 8, 4),
    ("vq-f16", VQModel, 16, 8), ("tiny-vq", VQModel, 8, 4),
])
def test_presets(name, cls, factor, channels):
    model = build_autoencoder(ModelConfig(preset=name))
    assert type(model) is cls
    assert downsample_factor(model) == factor and latent_channels(model) == channels
    if name.startswith("tiny"):
        assert 100_000 < count_parameters(model) < 1_000_000
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        assert reconstruct(model, x).shape == x.shape


def test_vq_presets_match_the_published_codebooks():
    assert PRESETS["vq-f4"].kwargs["num_vq_embeddings"] == 8192
    assert PRESETS["vq-f8"].kwargs["num_vq_embeddings"] == 16384
    assert "AttnDownEncoderBlock2D" in PRESETS["vq-f8"].kwargs["down_block_types"]
    assert PRESETS["vq-f16"].kwargs["vq_embed_dim"] == 8


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'kl-f8'"):
        build_autoencoder(ModelConfig(preset="kl_f8"))


def test_config_overrides_reach_the_constructor():
    model = build_autoencoder(ModelConfig(preset="tiny-kl", config={"latent_channels": 8}))
    assert model.config.latent_channels == 8
    with pytest.raises(ConfigError, match="does not fit AutoencoderKL"):
        build_autoencoder(ModelConfig(preset="tiny-kl", config={"no_such_argument": 1}))


def test_pretrained_folder_and_subfolder(tmp_path):
    original = build_autoencoder(ModelConfig(preset="tiny-kl"))
    original.save_pretrained(tmp_path / "pipeline" / "vae")
    loaded = build_autoencoder(ModelConfig(pretrained=str(tmp_path / "pipeline"), subfolder="vae"))
    for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    vq = build_autoencoder(ModelConfig(preset="tiny-vq"))
    vq.save_pretrained(tmp_path / "vq")
    assert type(load_autoencoder(str(tmp_path / "vq"))) is VQModel


def test_pickled_weights_are_refused(tmp_path):
    model = build_autoencoder(ModelConfig(preset="tiny-kl"))
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not list((tmp_path / "pickled").glob("*.safetensors"))
    with pytest.raises(OSError, match="no safetensors weights"):
        load_autoencoder(str(tmp_path / "pickled"))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        load_autoencoder(str(tmp_path))
