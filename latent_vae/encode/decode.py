"""Latents out again: reading an encode output, and decoding its rows to PNG previews."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from ..models.loading import load_autoencoder
from ..models.stock import Autoencoder, is_vq, latent_channels
from ..models.tiling import configure_tiling
from ..runtime import resolve_precision, run_with_fp32_fallback
from .storage import latent_to_tensor

if TYPE_CHECKING:  # imported where used: `import latent_vae` stays light
    import datasets


def load_latent_dataset(path: Union[str, Path]) -> Tuple["datasets.Dataset", Dict[str, Any]]:
    """An encode output directory -> (``datasets.Dataset`` of its rows, its ``encode_config.json``)."""
    import datasets

    path = Path(path)
    if not (path / "summary.json").is_file():
        if (path / "encode_config.json").is_file():
            raise DataError(f"{path} is an unfinished encode; rerun the same encode command to complete it")
        raise FileNotFoundError(f"{path} is not an encode output of `latent-vae encode` (no summary.json)")
    config = json.loads((path / "encode_config.json").read_text())
    output_format = config["identity"].get("output_format", "datasets")
    if output_format == "parquet":
        files = sorted(str(f) for f in (path / "data").glob("*.parquet"))
        return datasets.Dataset.from_parquet(files, keep_in_memory=False), config
    if output_format == "webdataset":
        raise DataError(f"{path} holds webdataset tar shards, which decode and stats do not read; read them with "
                        "webdataset or tarfile (docs/ENCODING.md), or encode with --format datasets or parquet")
    return datasets.load_from_disk(str(path)), config


def stored_dtype(config: Dict[str, Any]) -> str:
    """The storage dtype (fp32/fp16/bf16) recorded in an ``encode_config.json``."""
    return config["identity"]["latent"]["dtype"]


@torch.no_grad()
def decode_images(model: Autoencoder, latents: torch.Tensor, precision: str = "fp32") -> Tuple[torch.Tensor, bool]:
    """Stock ``model.decode(latents).sample`` (VQ: quantised first, as diffusers does) in fp32,
    under ``precision`` autocast with the fp32 fallback; returns (images in [-1, 1], retried)."""
    return run_with_fp32_fallback(lambda z: model.decode(z).sample, latents, precision)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded."""
    from ..evaluate.metrics import to_unit_range

    return to_unit_range(images).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def preview_name(position: int, row_id: str) -> str:
    """A file name for a row: its position, then its id reduced to safe characters (an id from a
    dataset can never name a path outside the output directory)."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(row_id).with_suffix("").as_posix())
    return f"{position:06d}-{stem.strip('._')[:80]}.png"


@dataclass
class DecodeSummary:
    output_dir: Path
    written: List[Path]
    fp32_retries: int = 0


def _decoding_model(latents_dir: Union[str, Path], config: Dict[str, Any],
                    model: Union[str, Path, Autoencoder, None]) -> Autoencoder:
    """``model``, or the one ``encode`` recorded; refused when its latent channels differ."""
    reference = model or config.get("model_path")
    if reference is None:
        raise ConfigError(f"{latents_dir} does not record where its model is; pass --model")
    vae = load_autoencoder(str(reference), subfolder=config.get("subfolder")) \
        if isinstance(reference, (str, Path)) else reference
    if latent_channels(vae) != config["latent_channels"]:
        raise ConfigError(f"the latents have {config['latent_channels']} channels but {reference} expects "
                          f"{latent_channels(vae)}; pass the model that encoded them with --model")
    return vae


def decode_latents(latents_dir: Union[str, Path], output_dir: Union[str, Path],
                   model: Union[str, Path, Autoencoder, None] = None, limit: Optional[int] = 16,
                   batch_size: Optional[int] = None, precision: str = "auto", tiled: bool = False,
                   tile_size: Optional[int] = None, tile_overlap: float = 0.25, device: Optional[str] = None,
                   progress: bool = True) -> DecodeSummary:
    """Decode the first ``limit`` rows (all when None) of an encode output to PNG files.

    The model defaults to the one recorded by ``encode``; the stored latents are the raw
    (unscaled) ones, decoded as they are. ``batch_size`` defaults to 8 on CUDA, 1 on CPU.
    """
    from tqdm.auto import tqdm

    dataset, config = load_latent_dataset(latents_dir)
    vae = _decoding_model(latents_dir, config, model)
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae.eval().requires_grad_(False).to(target)
    if tiled:
        configure_tiling(vae, tile_size, tile_overlap)
    precision = resolve_precision(precision, target, is_vq(vae))
    batch_size = batch_size or (8 if target.type == "cuda" else 1)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    rows = dataset.select(range(count)).select_columns(["id", "latent"]).with_format("numpy")
    dtype, written, retries = stored_dtype(config), [], 0
    for start in tqdm(range(0, count, batch_size), desc="decode", unit="batch", disable=not progress):
        batch = rows[start:start + batch_size]
        latents = [latent_to_tensor(value, dtype).float() for value in batch["latent"]]
        positions = list(range(start, start + len(latents)))
        for shape in dict.fromkeys(tuple(z.shape) for z in latents):  # buckets: one decode per shape
            members = [i for i, z in enumerate(latents) if tuple(z.shape) == shape]
            images, retried = decode_images(vae, torch.stack([latents[i] for i in members]).to(target), precision)
            retries += int(retried)
            for i, pixels in zip(members, images_to_uint8(images)):
                path = output_dir / preview_name(positions[i], str(batch["id"][i]))
                Image.fromarray(pixels).save(path)
                written.append(path)
    return DecodeSummary(output_dir, sorted(written), retries)
