"""What defines an encode's output (``encode_config.json``), and whether an output directory
holds a fresh, resumable or complete run of exactly that encode."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from ..data.sources import ImageSource
from ..data.streams import StreamSource
from ..errors import ConfigError
from ..models.stock import Autoencoder
from .options import EncodeOptions

FORMAT_VERSION = 2  # 2: shard manifests hold SHA-256 and indices; Array3D latents
LOCK_NAME = ".lock"  # held by the encode writing the folder (runtime.try_lock)


def model_fingerprint(model: Autoencoder) -> str:
    """SHA-256 of the weights: a resumed run must encode with exactly the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


def source_fingerprint(source: Union[ImageSource, StreamSource]) -> str:
    """What the inputs are: the shard list of a sharded input, the dataset fingerprint of a
    dataset, the file list of a folder."""
    if isinstance(source, StreamSource):
        return hashlib.sha256("\n".join(source.shards).encode()).hexdigest()
    digest = hashlib.sha256(str(len(source)).encode())
    dataset = getattr(source, "dataset", None)
    if dataset is not None:
        digest.update(str(getattr(dataset, "_fingerprint", "")).encode())
    else:
        for index in range(len(source)):
            digest.update(source.key(index).encode() + b"\n")
    return digest.hexdigest()


def model_path(model: Union[str, Path, Autoencoder]) -> Optional[str]:
    """Where ``decode`` can load the model from: an absolute local folder or a hub id."""
    name = model if isinstance(model, (str, Path)) else getattr(model.config, "_name_or_path", None)
    if not name:
        return None
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else str(name)


def diffusion_scaling(vae: Autoencoder) -> Dict[str, Any]:
    """The config fields by which ``model_input`` was made from ``latent``, as diffusers pipelines
    apply them (``models.stock.to_diffusion_latents``)."""
    config = vae.config
    fields = {name: config.get(name) for name in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}
    if fields["latents_mean"] is not None and fields["latents_std"] is not None:
        formula = "model_input = (latent - latents_mean) * scaling_factor / latents_std (per channel)"
    else:
        formula = "model_input = (latent - shift_factor) * scaling_factor" if fields["shift_factor"] \
            else "model_input = latent * scaling_factor"
    return {**fields, "formula": formula}


def run_identity(vae: Autoencoder, source: Union[ImageSource, StreamSource], opts: EncodeOptions,
                 precision: str) -> Dict[str, Any]:
    """Everything that determines the rows: a resumed run must match it exactly."""
    return {
        "format": FORMAT_VERSION,
        "model": {"class": type(vae).__name__, "weights_sha256": model_fingerprint(vae)},
        "data": {"source": str(source.name), "fingerprint": source_fingerprint(source),
                 "image_column": opts.image_column, "split": opts.split,
                 **({"shards": len(source.shards), "streaming": opts.streaming, "key_column": opts.key_column,
                     "image_key": opts.image_key, "max_samples": opts.max_samples}
                    if isinstance(source, StreamSource) else {"inputs": len(source)})},
        "preprocessing": {"resolution": opts.resolution, "buckets": opts.buckets, "patch_size": opts.patch_size,
                          "upscale": opts.upscale},
        "latent": {"mode": opts.latent, "seed": opts.seed, "dtype": opts.dtype, "precision": precision,
                   "layout": opts.layout,
                   "diffusion_scaling": diffusion_scaling(vae) if opts.layout == "diffusers" else None,
                   "tiled": opts.tiled, "tile_size": opts.tile_size if opts.tiled else None,
                   "tile_overlap": opts.tile_overlap if opts.tiled else None},
        "shard_size": opts.shard_size,
        "output_format": opts.output_format,
    }


def _differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a} -> {b}")
    return changed


def prepare_output(output_dir: Path, identity: Dict[str, Any], overwrite: bool) -> str:
    """'fresh', 'resume' or 'complete'; refuses to mix two different encodes in one directory."""
    config_path = output_dir / "encode_config.json"
    if overwrite or not output_dir.exists() or all(p.name.startswith(LOCK_NAME) for p in output_dir.iterdir()):
        return "fresh"
    if not config_path.is_file():
        raise ConfigError(f"{output_dir} is not empty and holds no latent_vae encode; choose a new --output-dir")
    previous = json.loads(config_path.read_text())
    changed = _differences(previous.get("identity", {}), identity)
    if changed:
        raise ConfigError(
            f"{output_dir} holds an encode with other settings ({'; '.join(changed[:3])}); "
            "rerun with the same settings to resume, choose a new --output-dir, or pass --overwrite to replace it")
    return "complete" if (output_dir / "summary.json").is_file() else "resume"
