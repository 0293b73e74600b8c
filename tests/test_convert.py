"""Single-file export/import in the original latent-diffusion / taming layout: bit-exact round
trips, diffusers' own from_single_file in a clean process, foreign files, refused pickles."""

import json
import os

import pytest
import torch
from conftest import run_python
from diffusers import AutoencoderKL, VQModel
from safetensors.torch import load_file, save_file

from latent_vae.cli import main
from latent_vae.errors import ConversionError, InvalidModel
from latent_vae.interop.single_file import (
    CONFIG_METADATA_KEY,
    export_single_file,
    import_single_file,
    infer_config,
    to_original_state_dict,
)
from latent_vae.presets import PRESETS, _blocks


def randomized(model):
    """Every tensor perturbed, so that a swapped pair of tensors (e.g. norm1/norm2, both
    initialised to ones) cannot go unnoticed."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def kl_model(**overrides):
    return randomized(AutoencoderKL(**{**PRESETS["tiny-kl"].kwargs, **overrides}))


def vq_model():
    # Attention in the lowest-resolution level too (the vq-f8 layout): encoder.down.N.attn, decoder.up.N.attn.
    return randomized(VQModel(**{**PRESETS["tiny-vq"].kwargs, **_blocks(4, attention_last=True)}))


def assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


CLEAN_PROCESS = """
import sys, torch
from diffusers import AutoencoderKL
folder, single = sys.argv[1], sys.argv[2]
reference = AutoencoderKL.from_pretrained(folder).eval()
converted = AutoencoderKL.from_single_file(single, config=folder).eval()
torch.manual_seed(0)
x = torch.rand(2, 3, 32, 32) * 2 - 1
with torch.no_grad():
    outputs = [(m.encode(x).latent_dist.mean, m.encode(x).latent_dist.logvar,
                m.decode(m.encode(x).latent_dist.mode()).sample) for m in (reference, converted)]
assert all(torch.equal(a, b) for a, b in zip(*outputs)), "outputs differ"
assert converted.config.scaling_factor == reference.config.scaling_factor
assert "latent_vae" not in sys.modules
print("bit-exact")
"""


def test_exported_file_loads_in_plain_diffusers_with_bit_identical_outputs(tmp_path):
    model = kl_model(scaling_factor=0.2)
    model.save_pretrained(tmp_path / "folder")
    assert main(["export", "--model", str(tmp_path / "folder"), "--format", "ldm",
                 "--output", str(tmp_path / "vae.safetensors")]) == 0
    result = run_python(CLEAN_PROCESS, str(tmp_path / "folder"), str(tmp_path / "vae.safetensors"),
                        env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bit-exact" in result.stdout


def test_export_writes_the_original_key_layout(tmp_path):
    model = kl_model()
    state = load_file(export_single_file(model, tmp_path / "vae.safetensors"))
    channels = model.config.block_out_channels
    # The names A1111/ComfyUI expect; attention projections as 1x1 convolutions.
    assert state["encoder.mid.attn_1.q.weight"].shape == (channels[-1], channels[-1], 1, 1)
    assert state["decoder.mid.attn_1.proj_out.weight"].shape == (channels[-1], channels[-1], 1, 1)
    assert torch.equal(state["encoder.down.0.block.0.conv1.weight"],
                       model.encoder.down_blocks[0].resnets[0].conv1.weight)
    assert torch.equal(state["encoder.down.1.block.0.nin_shortcut.weight"],
                       model.encoder.down_blocks[1].resnets[0].conv_shortcut.weight)
    assert torch.equal(state["encoder.mid.block_2.norm1.weight"], model.encoder.mid_block.resnets[1].norm1.weight)
    # The original counts decoder levels from the highest resolution: up.3 is diffusers' up_blocks.0.
    assert torch.equal(state["decoder.up.3.upsample.conv.weight"], model.decoder.up_blocks[0].upsamplers[0].conv.weight)
    assert torch.equal(state["decoder.up.0.block.1.conv2.weight"], model.decoder.up_blocks[3].resnets[1].conv2.weight)
    assert "decoder.up.0.upsample.conv.weight" not in state and "encoder.down.3.downsample.conv.weight" not in state
    assert {"quant_conv.weight", "post_quant_conv.weight", "encoder.norm_out.weight",
            "decoder.norm_out.bias"} <= set(state)
    assert len(state) == len(model.state_dict())


@pytest.mark.parametrize("make", [kl_model, vq_model], ids=["kl", "vq"])
def test_import_of_an_export_restores_identical_weights_and_config(tmp_path, make):
    model = make()
    export_single_file(model, tmp_path / "model.safetensors")
    restored, notes = import_single_file(tmp_path / "model.safetensors")
    assert type(restored) is type(model) and notes == []
    assert_same_weights(restored, model)
    assert json.loads(restored.to_json_string()) == json.loads(model.to_json_string())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        if isinstance(model, VQModel):
            outputs = [m.decode(m.encode(x).latents).sample for m in (restored, model)]
            assert torch.equal(*outputs)
            assert "quantize.embedding.weight" in load_file(tmp_path / "model.safetensors")
        else:
            assert torch.equal(restored.encode(x).latent_dist.mean, model.encode(x).latent_dist.mean)


@pytest.mark.parametrize("attention_shape", ["conv", "linear"])
def test_foreign_file_without_config_is_inferred_with_either_attention_shape(tmp_path, attention_shape):
    # 32-multiple widths: a latent-diffusion architecture (GroupNorm with 32 groups), no metadata.
    model = randomized(AutoencoderKL(**{**PRESETS["tiny-kl"].kwargs, **_blocks(2), "block_out_channels": (32, 64),
                                        "norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": 512}))
    state = to_original_state_dict(model)
    if attention_shape == "linear":
        state = {k: v[:, :, 0, 0] if ".attn_1." in k and v.dim() == 4 else v for k, v in state.items()}
    # A full checkpoint: the VAE under first_stage_model., plus tensors of other models.
    full = {f"first_stage_model.{k}": v for k, v in state.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 2)
    save_file(full, tmp_path / "full.safetensors")
    restored, notes = import_single_file(tmp_path / "full.safetensors")
    assert_same_weights(restored, model)
    assert restored.config.norm_num_groups == 32 and restored.config.latent_channels == 4
    assert any("ignored 1 tensors" in n for n in notes) and any("scaling_factor" in n for n in notes)
    assert import_single_file(tmp_path / "full.safetensors", scaling_factor=0.13025)[0].config.scaling_factor == 0.13025


def test_tiny_widths_need_a_config_and_a_config_makes_them_exact(tmp_path):
    model = kl_model()
    model.save_pretrained(tmp_path / "folder")
    save_file(to_original_state_dict(model), tmp_path / "bare.safetensors")  # no metadata
    with pytest.raises(ConversionError, match="--config"):
        import_single_file(tmp_path / "bare.safetensors")
    restored, _ = import_single_file(tmp_path / "bare.safetensors", config=tmp_path / "folder")
    assert_same_weights(restored, model)


def test_mismatched_architecture_names_the_tensors(tmp_path):
    model = kl_model()
    model.save_config(tmp_path / "cfg")
    state = to_original_state_dict(model)
    del state["decoder.up.1.block.0.conv1.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ConversionError, match="missing 1 tensors.*decoder.up.1.block.0.conv1.weight"):
        import_single_file(tmp_path / "broken.safetensors", config=tmp_path / "cfg" / "config.json")


def test_ckpt_files_load_with_weights_only_and_pickles_are_refused(tmp_path):
    model = vq_model()
    plain = {k: v.clone() for k, v in to_original_state_dict(model).items()}
    plain["loss.discriminator.main.0.weight"] = torch.zeros(1)  # taming training checkpoints carry the GAN
    torch.save({"state_dict": plain, "global_step": 10}, tmp_path / "vqgan.ckpt")
    model.save_config(tmp_path / "cfg")
    restored, notes = import_single_file(tmp_path / "vqgan.ckpt", config=tmp_path / "cfg")
    assert_same_weights(restored, model)
    assert notes == ["ignored 1 tensors that are not part of the autoencoder"]

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"encoder.conv_in.weight": Payload()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ConversionError, match="refused"):
        import_single_file(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_export_and_import_commands(tmp_path, capsys):
    model = kl_model()
    model.save_pretrained(tmp_path / "folder")
    single = tmp_path / "vae.safetensors"
    assert main(["export", "--model", str(tmp_path / "folder"), "--output", str(single)]) == 0
    assert main(["export", "--model", str(tmp_path / "folder"), "--output", str(single)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import", "--checkpoint", str(single), "--output-dir", str(tmp_path / "back")]) == 0
    assert "AutoencoderKL.from_pretrained" in capsys.readouterr().out
    assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "back"), model)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    assert main(["import", "--checkpoint", str(single), "--output-dir", str(tmp_path / "notes"), "--overwrite"]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    assert main(["export", "--model", str(tmp_path / "folder"), "--output", str(tmp_path / "half.safetensors"),
                 "--dtype", "fp16"]) == 0
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "half.safetensors").values())
    assert main(["import", "--checkpoint", str(tmp_path / "missing.safetensors"), "--output-dir",
                 str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_infer_config_reads_the_architecture_from_shapes():
    model = randomized(AutoencoderKL(**{**PRESETS["kl-f8"].kwargs, "block_out_channels": (32, 32, 64, 64),
                                        "latent_channels": 16}))
    config = infer_config(to_original_state_dict(model))
    assert config["block_out_channels"] == [32, 32, 64, 64]
    assert config["down_block_types"] == list(model.config.down_block_types)
    assert config["up_block_types"] == list(model.config.up_block_types)
    assert config["layers_per_block"] == 2 and config["latent_channels"] == 16
    assert config["scaling_factor"] == 1.0  # not the SD value: only 4-channel VAEs get 0.18215


def with_metadata_config(path, **changes):  # _raw="...": the metadata's text itself
    """The exported file rewritten with its metadata's diffusers config edited (as a hostile file could)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    raw = changes.pop("_raw", None)
    text = raw or json.dumps({**json.loads(metadata[CONFIG_METADATA_KEY]), **changes})
    save_file(state, str(path), metadata={**metadata, CONFIG_METADATA_KEY: text})


@pytest.mark.parametrize("changes, error, match", [
    ({"layers_per_block": 10_000_000}, InvalidModel, "layers_per_block"),
    ({"block_out_channels": [1_000_000, 32, 32, 32]}, InvalidModel, "block_out_channels"),
    ({"_raw": "{not json"}, InvalidModel, "not valid JSON"),
    ({"latent_channels": 8}, ConversionError, "shape"),  # sane alone, but not these tensors
])
def test_metadata_config_of_an_untrusted_file_is_checked_before_anything_is_built(tmp_path, monkeypatch,
                                                                                  changes, error, match):
    export_single_file(kl_model(), tmp_path / "vae.safetensors")
    with_metadata_config(tmp_path / "vae.safetensors", **changes)

    def never(*args, **kwargs):
        raise AssertionError("a model was built from an unchecked config")

    monkeypatch.setattr(AutoencoderKL, "from_config", never)
    with pytest.raises(error, match=match):
        import_single_file(tmp_path / "vae.safetensors")
