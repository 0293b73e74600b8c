"""What the latent tools share: the model on a device, inputs read as batches, decoding latents,
and writing tables (images: ``data.images.to_pil`` / ``image_grid``).

Latent spaces (docs/LATENT_TOOLS.md):

- *model latents* ``z``: what ``vae.decode`` consumes (``models.stock.decoder_latents``). KL: the
  posterior mean (the mode, as in ``models.stock.reconstruct``); VQ: the quantised latents (codebook rows).
- *scaled latents*: the space a latent diffusion model is trained in, diffusers' convention
  ``(z − shift_factor) · scaling_factor``, or ``(z − latents_mean) · scaling_factor / latents_std``
  per channel when the config has ``latents_mean`` / ``latents_std``: ``models.stock.to_diffusion_latents``
  and its inverse ``models.stock.from_diffusion_latents``.
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.sources import Failure, FolderSource, ImageSource, open_source
from ..errors import ConfigError
from ..evaluate.dataset import EvalDataset, collate_eval_batch
from ..models.loading import load_autoencoder
from ..models.stock import Autoencoder, downsample_factor

# --------------------------------------------------------------------------- model and device


def resolve_device(name: Optional[str]) -> torch.device:
    """``name`` as a torch device; default CUDA when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device; use e.g. cpu, cuda or cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def load_model(name_or_path: str, device: torch.device, subfolder: Optional[str] = None) -> Autoencoder:
    """The autoencoder in eval mode, fp32 (half-precision VAEs overflow, GUIDE §3), on ``device``."""
    model = load_autoencoder(name_or_path, subfolder=subfolder).to(device)
    return (model if model.dtype == torch.float32 else model.float()).eval()


def check_resolution(model: Autoencoder, resolution: int) -> None:
    factor = downsample_factor(model)
    if resolution < factor or resolution % factor:
        nearest = max(factor, round(resolution / factor) * factor)
        raise ConfigError(f"--resolution {resolution} is not a multiple of the model's downsampling factor "
                          f"{factor}; use e.g. --resolution {nearest}")


# --------------------------------------------------------------------------- inputs


class _InputsSource(ImageSource):
    """Several inputs (folders, datasets, files) read as one, in the order given."""

    def __init__(self, parts: List[Tuple[str, ImageSource]]):
        self.parts = parts
        self.offsets = [0]
        for _, source in parts:
            self.offsets.append(self.offsets[-1] + len(source))
        self.name = ", ".join(prefix or source.name for prefix, source in parts)

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> Tuple[str, ImageSource, int]:
        part = bisect.bisect_right(self.offsets, index) - 1
        prefix, source = self.parts[part]
        return prefix, source, index - self.offsets[part]

    def key(self, index: int) -> str:
        prefix, source, local = self._locate(index)
        return _prefixed(prefix, source.key(local))

    def read(self, index: int) -> Image.Image:
        _, source, local = self._locate(index)
        return source.read(local)


def _prefixed(prefix: str, key: str) -> str:
    return f"{prefix.rstrip('/')}/{key}" if prefix else key


def open_inputs(inputs: Sequence[str]) -> Tuple[ImageSource, List[Failure]]:
    """Image folders, image files and saved datasets as one source, in the order given.

    Keys: a file keeps the path as given; an image of a folder or dataset is keyed relative to
    it (prefixed with the folder when several inputs are given, so keys stay unique). Inputs
    already known to be unusable are returned as failures, never dropped silently.
    """
    if not inputs:
        raise ConfigError("no images given: pass image folders or files")
    parts: List[Tuple[str, ImageSource]] = []
    failures: List[Failure] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            # Keys relative to the working directory: the path as the user typed it.
            parts.append(("", FolderSource(Path("."), [path], name=item)))
            continue
        if not path.exists() and path.suffix:
            raise FileNotFoundError(f"{item}: no such image file or folder")
        source, bad = open_source(item)
        prefix = item if len(inputs) > 1 else ""
        parts.append((prefix, source))
        failures += [Failure(_prefixed(prefix, f.key), f.reason) for f in bad]
    return (parts[0][1] if len(parts) == 1 else _InputsSource(parts)), failures


@dataclass
class Batch:
    keys: List[str]
    pixels: Optional[torch.Tensor]  # (B, 3, R, R) in [-1, 1]; None when no image of the batch was readable
    failures: List[Failure] = field(default_factory=list)


def iter_batches(source: ImageSource, resolution: int, batch_size: int, desc: Optional[str] = None) -> Iterator[Batch]:
    """The source's images in order, ``batch_size`` at a time, resized (shorter side) and
    centre-cropped as ``eval`` does; unreadable ones become failures."""
    dataset = EvalDataset(source, range(len(source)), resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_eval_batch)
    with tqdm(total=len(source), desc=desc, unit="img", disable=desc is None, dynamic_ncols=True) as progress:
        for batch in loader:
            keys = [source.key(index) for index in batch["indices"]]
            progress.update(len(keys) + len(batch["failures"]))
            yield Batch(keys, batch["pixel_values"], batch["failures"])


def load_images(source: ImageSource, resolution: int) -> Tuple[List[str], Optional[torch.Tensor], List[Failure]]:
    """All images of a (small) source: keys, pixels (N, 3, R, R) or None, failures."""
    keys, tensors, failures = [], [], []
    for batch in iter_batches(source, resolution, batch_size=16):
        keys += batch.keys
        failures += batch.failures
        if batch.pixels is not None:
            tensors.append(batch.pixels)
    return keys, (torch.cat(tensors) if tensors else None), failures


# --------------------------------------------------------------------------- latents


@torch.no_grad()
def decode_latents(model: Autoencoder, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Model latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1], on the CPU."""
    chunks = [model.decode(chunk.to(model.device)).sample.clamp(-1, 1).cpu() for chunk in latents.split(batch_size)]
    return torch.cat(chunks)


# --------------------------------------------------------------------------- files


def unique_stems(keys: Sequence[str]) -> List[str]:
    """Flat file names for input keys: 'a/b/c.png' -> 'a__b__c'; a repeated stem ('c.png' and
    'c.jpg') gets '-2', '-3' ... so no output overwrites another."""
    stems: List[str] = []
    for key in keys:
        base = key.rsplit(".", 1)[0] if "." in Path(key).name else key
        base = base.strip("/").replace("/", "__").replace("\\", "__") or "image"
        stem, count = base, 1
        while stem in stems:
            count += 1
            stem = f"{base}-{count}"
        stems.append(stem)
    return stems


def write_failures(failures: Sequence[Failure], path: Path) -> Optional[Path]:
    """``key,reason`` for each unusable input; nothing is written when there is none."""
    if not failures:
        return None
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "reason"])
        writer.writerows([f.key, f.reason] for f in failures)
    return path


def write_csv(rows: Sequence[Dict[str, object]], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["key"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def require_images(pixels: Optional[torch.Tensor], failures: Sequence[Failure], minimum: int,
                   what: str) -> torch.Tensor:
    """``pixels`` (or latents: one row per image), or one error naming how many images were
    unreadable and why."""
    count = 0 if pixels is None else pixels.shape[0]
    if count < minimum:
        detail = "; ".join(f"{f.key}: {f.reason}" for f in failures[:3])
        raise ConfigError(f"{what} needs at least {minimum} readable images, got {count}"
                          + (f" ({len(failures)} unreadable: {detail})" if failures else ""))
    return pixels
