"""Checks on model files from anywhere, before anything is built or allocated.

A ``config.json`` or single-file metadata can ask for a 10⁶-channel layer or 10⁷ blocks; a
safetensors header can claim gigabytes. Each field is checked against sane bounds, the model is
then built on the ``meta`` device (no memory) and its tensor shapes compared with those the
weights file declares in its header. Every failure is one line naming the field or tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, Mapping

import torch

from ..errors import ConfigError, InvalidModel
from .stock import Autoencoder

# A safetensors header is JSON of a few hundred bytes per tensor; more than this is damage or malice.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024

# (field, smallest, largest): generous for any published VAE (SD/SDXL/SD3/FLUX, VQGAN, LlamaGen).
INT_BOUNDS = {
    "in_channels": (1, 64), "out_channels": (1, 64), "latent_channels": (1, 4096), "layers_per_block": (1, 32),
    "norm_num_groups": (1, 4096), "sample_size": (1, 1 << 16), "num_vq_embeddings": (1, 1 << 22),
    "vq_embed_dim": (1, 4096),
}
MAX_LEVELS, MAX_WIDTH = 8, 8192


def _bad(source: str, message: str) -> InvalidModel:
    return InvalidModel(f"{source}: {message}; the model folder or file is damaged or not a diffusers "
                        "AutoencoderKL/VQModel/AutoencoderTiny")


def read_json_config(path: Path) -> Dict[str, Any]:
    """A ``config.json`` of bounded size that parses to a mapping."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise _bad(str(path), f"config.json is {size} bytes (limit {MAX_CONFIG_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _bad(str(path), f"config.json is not valid JSON ({err})") from None
    return parse_json_config(text, str(path), "config.json")


def parse_json_config(text: str, source: str, what: str) -> Dict[str, Any]:
    """A diffusers config from JSON text (a config.json, or a single file's metadata): bounded, a mapping."""
    if len(text) > MAX_CONFIG_BYTES:
        raise _bad(source, f"{what} is {len(text)} characters (limit {MAX_CONFIG_BYTES})")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise _bad(source, f"{what} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise _bad(source, f"{what} does not hold a mapping")
    return config


def check_config(config: Mapping[str, Any], classes: Mapping[str, type], source: str) -> type:
    """The class the config names, after every size field is checked; raises ``InvalidModel``."""
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name not in classes:
        raise _bad(source, f"_class_name is {class_name!r}; supported: {', '.join(classes)}")
    for name, (low, high) in INT_BOUNDS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _bad(source, f"{name}={value!r} is outside [{low}, {high}]")
    widths = config.get("block_out_channels", [64])
    if (not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= MAX_LEVELS
            or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH for w in widths)):
        raise _bad(source, f"block_out_channels={widths!r} must be 1 to {MAX_LEVELS} widths in [1, {MAX_WIDTH}]")
    groups = config.get("norm_num_groups", 32 if class_name != "AutoencoderTiny" else 1)  # TAESD has no norms
    if any(w % groups for w in widths):
        raise _bad(source, f"norm_num_groups={groups} does not divide block_out_channels={list(widths)}")
    for name in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                 "num_decoder_blocks"):  # AutoencoderTiny's levels: a width and a block count each
        values, low = config.get(name), 0 if name.startswith("num_") else 1
        if values is not None and (
                not isinstance(values, (list, tuple)) or not 1 <= len(values) <= MAX_LEVELS
                or not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_WIDTH for v in values)):
            raise _bad(source, f"{name}={values!r} must be 1 to {MAX_LEVELS} numbers in [{low}, {MAX_WIDTH}]")
    for name in ("down_block_types", "up_block_types"):
        blocks = config.get(name)
        if blocks is not None and (not isinstance(blocks, (list, tuple)) or len(blocks) != len(widths)):
            raise _bad(source, f"{name} must list one block per entry of block_out_channels ({len(widths)})")
    for name in ("scaling_factor", "shift_factor"):
        value = config.get(name)
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise _bad(source, f"{name}={value!r} is not a finite number")
    return classes[class_name]


def build_on_meta(cls: type, config: Mapping[str, Any], source: str) -> Autoencoder:
    """The model with no memory behind its tensors: its shapes, for comparison with the weights."""
    init_keys = set(cls.extract_init_dict(dict(config))[0])
    try:
        with torch.device("meta"):
            return cls(**{k: v for k, v in config.items() if k in init_keys})
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        raise _bad(source, f"its config does not build a {cls.__name__} ({type(err).__name__}: {err})") from None


def read_safetensors_header(path: Path) -> Dict[str, Dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets} from a safetensors header, bounded and checked
    against the file size, without reading any tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _bad(str(path), f"{size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise _bad(str(path), f"its safetensors header claims {length} bytes (file: {size} bytes, "
                       f"limit {MAX_HEADER_BYTES})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _bad(str(path), f"its safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _bad(str(path), "its safetensors header is not a mapping")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= size - 8 - length):
            raise _bad(str(path), f"tensor {name!r} lies outside the file (offsets {offsets})")
    return tensors


def check_weights_match(model: Autoencoder, header: Mapping[str, Mapping[str, Any]], source: str) -> None:
    """The tensors the weights and the config-built ``model`` share have the same shapes (names diffusers
    renames on load, such as old attention keys, are left to it), and they share at least one."""
    shared = 0
    for key, tensor in model.state_dict().items():
        entry = header.get(key)
        if entry is None:
            continue
        shared += 1
        if list(entry.get("shape", [])) != list(tensor.shape):
            raise _bad(source, f"tensor {key!r} has shape {entry.get('shape')} in the weights but "
                       f"{list(tensor.shape)} by the config")
    if not shared:
        raise _bad(source, "the weights hold none of the tensors its config describes")


def check_tiny_levels(config: Mapping[str, Any], key: str) -> int:
    """An ``AutoencoderTiny`` config built from ``key`` (the config section, for the message) that diffusers
    would build but not run, or run at another factor than it reports: one width per half, and an encoder
    that downsamples as much as the decoder upsamples. Returns that factor."""
    for part in ("encoder", "decoder"):
        widths = list(config[f"{part}_block_out_channels"])
        if len(set(widths)) > 1:
            raise ConfigError(f"{key}.{part}_block_out_channels={widths}: AutoencoderTiny needs one width for all "
                              f"levels (e.g. {[widths[0]] * len(widths)})")
    encoder = 2 ** (len(config["encoder_block_out_channels"]) - 1)
    decoder = config["upsampling_scaling_factor"] ** (len(config["decoder_block_out_channels"]) - 1)
    if encoder != decoder:
        raise ConfigError(f"{key}: the encoder downsamples by {encoder} and the decoder upsamples by {decoder}; "
                          "give both halves the same number of levels (and upsampling_scaling_factor 2)")
    return encoder
