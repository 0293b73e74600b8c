"""Single-file checkpoints in the original latent-diffusion / taming-transformers key layout.

A1111 and ComfyUI load a VAE as one ``.safetensors`` file with the keys of latent-diffusion's
``AutoencoderKL`` (``encoder.down.0.block.0.conv1.weight``, ``encoder.mid.attn_1.q.weight``,
``quant_conv.weight``, ``decoder.up.3.upsample.conv.weight`` ...); taming-transformers'
``VQModel`` (and latent-diffusion's) use the same encoder/decoder keys plus
``quantize.embedding.weight``. This module maps a diffusers ``AutoencoderKL`` / ``VQModel``
to that layout and back, tensor for tensor (no value is changed, only names and the shape of
the attention projections):

- ``down_blocks.i.resnets.j`` <-> ``down.i.block.j``; ``attentions.j`` <-> ``attn.j``;
  ``downsamplers.0`` <-> ``downsample``; ``conv_shortcut`` <-> ``nin_shortcut``;
- ``mid_block.resnets.0/1`` <-> ``mid.block_1/2``; ``mid_block.attentions.0`` <-> ``mid.attn_1``;
- ``decoder.up_blocks.i`` <-> ``decoder.up.(L-1-i)`` (the original counts decoder levels from
  the highest resolution, diffusers from the lowest);
- attention ``group_norm``/``to_q``/``to_k``/``to_v``/``to_out.0`` <-> ``norm``/``q``/``k``/``v``/
  ``proj_out``; the original stores q/k/v/proj_out as 1×1 convolutions (C, C, 1, 1), diffusers
  as linear layers (C, C); both shapes (and Conv1d's (C, C, 1)) are accepted on import.

The original layout carries no configuration. On export, the diffusers config is stored in the
file's safetensors metadata (ignored by other tools), so importing our own export restores the
exact model; for other files the architecture is inferred from the tensor shapes (see
``infer_config``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, ConversionError, UnreadableWeights
from ..models.checks import build_on_meta, check_config, parse_json_config, read_json_config
from ..models.loading import SUPPORTED
from ..models.stock import Autoencoder, is_tiny, is_vq
from ..runtime import atomic_write
from ..weights import read_weights

CONFIG_METADATA_KEY = "latent_vae.diffusers_config"
# Keys of a full Stable Diffusion / latent-diffusion checkpoint that hold its first stage.
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Top-level modules of the original autoencoders; other keys (the discriminator and LPIPS of
# ``loss.*`` in taming training checkpoints, a UNet...) are not part of the VAE.
VAE_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
# The scaling factor every SD 1.x/2.x VAE uses; diffusers' from_single_file assumes it too.
SD_SCALING_FACTOR = 0.18215
ATTENTION_PROJECTIONS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


# --------------------------------------------------------------------------- key mapping

_LEAF_NAMES = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k",
               "to_v": "v", "to_out.0": "proj_out", "conv_norm_out": "norm_out"}
_LEAF_PATTERN = re.compile(r"\.(" + "|".join(re.escape(k) for k in _LEAF_NAMES) + r")\.")


def original_key(diffusers_key: str, levels: int) -> str:
    """The latent-diffusion name of a diffusers AutoencoderKL/VQModel parameter."""
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", diffusers_key)
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", key)
    key = (key.replace(".resnets.", ".block.").replace(".attentions.", ".attn.")
           .replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample."))
    return _LEAF_PATTERN.sub(lambda m: f".{_LEAF_NAMES[m.group(1)]}.", key)


def _is_attention_projection(diffusers_key: str) -> bool:
    return diffusers_key.endswith(ATTENTION_PROJECTIONS)


def to_original_state_dict(model: Autoencoder) -> Dict[str, torch.Tensor]:
    """The model's weights under their latent-diffusion names (attention projections as 1×1 convs)."""
    levels = len(model.config.block_out_channels)
    state = {}
    for key, tensor in model.state_dict().items():
        if _is_attention_projection(key):
            tensor = tensor[:, :, None, None]
        state[original_key(key, levels)] = tensor.detach().contiguous()
    return state


def load_original_state_dict(model: Autoencoder, state: Dict[str, torch.Tensor]) -> None:
    """Copy an original-layout state dict into ``model``; every tensor must be used, none missing."""
    model.load_state_dict(converted_state_dict(model, state), strict=True)


def converted_state_dict(model: Autoencoder, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` under ``model``'s diffusers names, checked tensor for tensor against ``model``'s shapes
    (``model`` may live on the meta device: nothing is copied)."""
    levels = len(model.config.block_out_channels)
    targets = model.state_dict()
    converted, missing = {}, []
    for key, target in targets.items():
        name = original_key(key, levels)
        if name not in state:
            missing.append(name)
            continue
        tensor = state[name]
        if _is_attention_projection(key) and tensor.dim() > 2 and all(s == 1 for s in tensor.shape[2:]):
            tensor = tensor.reshape(tensor.shape[:2])  # 1×1 conv (or conv1d) -> linear
        if tensor.shape != target.shape:
            raise ConversionError(f"{name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(target.shape)}; the architecture does not match the file")
        converted[key] = tensor
    used = {original_key(k, levels) for k in targets}
    unexpected = sorted(k for k in state if k not in used)
    if missing or unexpected:
        raise ConversionError(
            "the file does not match the architecture"
            + (f"; missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})" if missing else "")
            + (f"; {len(unexpected)} tensors left over (e.g. {', '.join(unexpected[:3])})" if unexpected else "")
            + ". Give the model's diffusers config with --config"
        )
    return converted


# --------------------------------------------------------------------------- files


def read_checkpoint(path: str | Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, safetensors metadata) of a single-file checkpoint, read safely (``weights.read_weights``)."""
    try:
        return read_weights(path)
    except UnreadableWeights as err:
        raise ConversionError(str(err)) from None


def vae_tensors(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], int]:
    """The autoencoder's tensors (prefix of a full SD checkpoint removed) and how many were left out."""
    total = len(state)
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix + "decoder.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    vae = {k: v for k, v in state.items() if k.startswith(VAE_MODULES)}
    if not vae:
        raise ConversionError("no autoencoder tensors found (expected encoder.*, decoder.* keys"
                              + (", or first_stage_model.* in a full checkpoint)" if state else ")"))
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in vae):
        raise ConversionError("this file is in the diffusers layout already; put it in a folder with its "
                              "config.json and load that folder")
    return vae, total - len(vae)


def export_single_file(model: Autoencoder, path: str | Path, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` as one original-layout ``.safetensors`` file (atomically: ``runtime.atomic_write``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: the output must be a .safetensors file")
    if is_tiny(model):
        raise ConfigError("the single-file (latent-diffusion) layout holds an AutoencoderKL or VQModel; an "
                          "AutoencoderTiny has none: share its folder (AutoencoderTiny.from_pretrained; "
                          "--push-to-hub without --output uploads it)")
    state = to_original_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: model.to_json_string()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


# --------------------------------------------------------------------------- architecture


def _count(state: Dict[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct values of the first group of ``pattern`` among the keys."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def infer_config(state: Dict[str, torch.Tensor]) -> Dict:
    """A diffusers config for an original-layout state dict, from its tensor shapes.

    Not stored in the weights, hence defaults: GroupNorm with 32 groups (all latent-diffusion
    and taming models), SiLU, ``sample_size`` 512 (only sets the tile size of tiled decoding).
    """
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    if levels == 0 or "decoder.conv_in.weight" not in state:
        raise ConversionError("not a latent-diffusion/taming autoencoder (no encoder.down.* or decoder.conv_in)")
    channels = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    if any(c % 32 for c in channels):
        raise ConversionError(f"channel widths {channels} do not fit 32 GroupNorm groups; give the "
                              "diffusers config with --config")
    layers = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    encoder_attention = [f"encoder.down.{i}.attn.0.q.weight" in state for i in range(levels)]
    decoder_attention = [f"decoder.up.{levels - 1 - i}.attn.0.q.weight" in state for i in range(levels)]
    vq = "quantize.embedding.weight" in state
    config = dict(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in encoder_attention],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in decoder_attention],
        block_out_channels=channels, layers_per_block=layers, act_fn="silu", norm_num_groups=32,
        sample_size=512, mid_block_add_attention="encoder.mid.attn_1.q.weight" in state,
    )
    if vq:
        codes, dim = state["quantize.embedding.weight"].shape
        config.update(_class_name="VQModel", latent_channels=state["encoder.conv_out.weight"].shape[0],
                      num_vq_embeddings=codes, vq_embed_dim=dim, scaling_factor=1.0)
    else:
        latent = state["decoder.conv_in.weight"].shape[1]
        config.update(_class_name="AutoencoderKL", latent_channels=latent,
                      use_quant_conv="quant_conv.weight" in state,
                      use_post_quant_conv="post_quant_conv.weight" in state,
                      scaling_factor=SD_SCALING_FACTOR if latent == 4 else 1.0)
    return config


def _read_config(path: str | Path) -> Dict:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"diffusers config not found: {path} (give a model folder or its config.json)")
    return read_json_config(path)


def model_from_config(config: Dict, state: Dict[str, torch.Tensor], source: str) -> Autoencoder:
    """The model ``config`` describes, built only after its fields are checked (``models.checks``) and the
    model built on the meta device is found to match the file's tensors: a config from an untrusted
    file's metadata is no more trusted than a config.json."""
    cls = check_config(config, SUPPORTED, source)
    converted_state_dict(build_on_meta(cls, config, source), state)
    return cls.from_config(config)


def import_single_file(path: str | Path, config: Optional[str | Path] = None,
                       scaling_factor: Optional[float] = None) -> Tuple[Autoencoder, List[str]]:
    """An original-layout single file as a diffusers model, and notes for the user.

    The architecture comes from ``config`` (a diffusers folder or config.json), else from the
    file's metadata (our exports), else from the tensor shapes. ``scaling_factor`` overrides the
    config's; it is not stored in original-layout files.
    """
    state, metadata = read_checkpoint(path)
    state, left_out = vae_tensors(state)
    notes = [f"ignored {left_out} tensors that are not part of the autoencoder"] if left_out else []
    if config is not None:
        model_config = _read_config(config)
    elif CONFIG_METADATA_KEY in metadata:
        model_config = parse_json_config(metadata[CONFIG_METADATA_KEY], str(path), "its metadata's diffusers config")
    else:
        model_config = infer_config(state)
        notes.append("architecture inferred from the tensor shapes (GroupNorm 32 groups); "
                     "pass --config to set it explicitly")
        if scaling_factor is None:
            known = "" if "quantize.embedding.weight" in state else " (SD 1.x/2.x: 0.18215, SDXL: 0.13025)"
            notes.append(f"scaling_factor is not stored in single files: set to {model_config['scaling_factor']}"
                         f"{known}; pass --scaling-factor, or compute it from your images")
    if scaling_factor is not None:
        model_config["scaling_factor"] = float(scaling_factor)
    if ("quantize.embedding.weight" in state) != (model_config.get("_class_name") == "VQModel"):
        raise ConversionError("the config's model class does not match the file (codebook present: "
                              f"{'quantize.embedding.weight' in state})")
    model = model_from_config(model_config, state, str(config or path))
    load_original_state_dict(model, state)
    return model.eval(), notes


def describe(model: Autoencoder) -> str:
    kind = f"VQModel, {model.config.num_vq_embeddings} codes" if is_vq(model) else "AutoencoderKL"
    return (f"{kind}, channels {list(model.config.block_out_channels)}, "
            f"{model.config.latent_channels} latent channels, scaling_factor {model.config.scaling_factor:g}")
