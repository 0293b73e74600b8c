"""Untrusted model folders: absurd or inconsistent configs and weights headers get one line naming
the field, before anything is built or allocated (each case hung or allocated 100+ GB before)."""

import json
import struct

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from latent_vae.config import ModelConfig
from latent_vae.errors import InvalidModel
from latent_vae.models import loading
from latent_vae.models.loading import build_autoencoder, load_autoencoder


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "vae"
    torch.manual_seed(0)
    build_autoencoder(ModelConfig(preset="tiny-kl")).save_pretrained(path)
    return path


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, field", [
    ({"block_out_channels": [1_000_000, 32, 32, 32]}, "block_out_channels"),
    ({"layers_per_block": 10_000_000}, "layers_per_block"),
    ({"latent_channels": 1 << 30}, "latent_channels"),
    ({"norm_num_groups": 0}, "norm_num_groups"),
    ({"norm_num_groups": 7}, "norm_num_groups"),
    ({"_class_name": "UNet2DModel"}, "_class_name"),
    ({"down_block_types": ["DownEncoderBlock2D"]}, "down_block_types"),
    ({"scaling_factor": float("nan")}, "scaling_factor"),
    ({"in_channels": "three"}, "in_channels"),
])
def test_absurd_config_fields_are_named_before_anything_is_built(folder, changes, field, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a model was built from an unchecked config")

    monkeypatch.setattr(loading, "build_on_meta", never)
    for cls in (AutoencoderKL, VQModel):
        monkeypatch.setattr(cls, "from_pretrained", never)
    edit_config(folder, **changes)
    with pytest.raises(InvalidModel, match=field):
        load_autoencoder(str(folder))


def test_a_config_that_does_not_fit_the_weights_names_the_tensor(folder):
    edit_config(folder, latent_channels=8)  # sane on its own, but the weights hold a 4-channel latent
    with pytest.raises(InvalidModel, match=r"tensor '.*' has shape .* in the weights but .* by the config"):
        load_autoencoder(str(folder))


def test_a_huge_safetensors_header_is_called_what_it_is(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(InvalidModel, match="safetensors header claims 1099511627776 bytes"):
        load_autoencoder(str(folder))


def test_a_header_pointing_outside_the_file_is_refused(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**12]
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    with pytest.raises(InvalidModel, match="outside the file"):
        load_autoencoder(str(folder))


def test_a_garbled_config_is_one_line(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(InvalidModel, match="not valid JSON"):
        load_autoencoder(str(folder))


def test_a_sound_folder_still_loads_identically(folder):
    model = load_autoencoder(str(folder))
    torch.manual_seed(0)
    reference = build_autoencoder(ModelConfig(preset="tiny-kl"))
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
