"""Writing a trained model as a stock diffusers folder, with its latent scale and a model card."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from ..models.stock import Autoencoder, count_parameters, downsample_factor, is_vq, latent_channels, training_latents
from ..models.tiling import DEFAULT_TILE_SIZE
from ..runtime import replace_dir


@torch.no_grad()
def compute_scaling_factor(model: Autoencoder, batches: Iterable[torch.Tensor], seed: int = 0) -> Optional[float]:
    """1 / std of the latents over the given images (how SD's 0.18215 was obtained)."""
    count, total, total_sq = 0, 0.0, 0.0
    generator = None
    for images in batches:
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(seed)
        latents = training_latents(model, images, generator).double()
        count += latents.numel()
        total += latents.sum().item()
        total_sq += latents.pow(2).sum().item()
    if count < 2:
        return None
    variance = (total_sq - total * total / count) / (count - 1)
    return float(1.0 / max(variance, 1e-12) ** 0.5)


def set_tile_size(model: Autoencoder, resolution: int) -> int:
    """Set ``config.sample_size``, the tile size of stock ``enable_tiling()``, and return it.

    diffusers' default of 32 makes stock tiling cut a 256² image into 32-pixel tiles, each normalised
    (GroupNorm) on its own: colours shift and seams show (21 dB against untiled). The exported size is
    the largest of 512 px (SD 1.x's own VAE config, and ``models.tiling``'s default), the training
    resolution and a fine-tuned model's own value, rounded up to a multiple of 4 × the downsampling
    factor so that diffusers' 25% tile overlap is a whole number of latents (see ``models.tiling``).
    Images up to that size are decoded whole, exactly as untiled.
    """
    current = model.config.sample_size
    current = max(current) if isinstance(current, (list, tuple)) else int(current or 0)
    factor = downsample_factor(model)
    step = 4 * factor
    size = -(-max(DEFAULT_TILE_SIZE, int(resolution), current) // step) * step
    model.register_to_config(sample_size=size)
    if hasattr(model, "tile_sample_min_size"):  # this process's tiling follows the new config too
        model.tile_sample_min_size, model.tile_latent_min_size = size, size // factor
    return size


def save_diffusers_model(model: Autoencoder, folder: str | Path) -> Path:
    """``save_pretrained`` (safetensors) into a staging folder, then swapped into place (``runtime.replace_dir``)."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    return replace_dir(staging, folder)


def write_model_card(folder: str | Path, model: Autoencoder, recipe: Dict, steps: int,
                     metrics: Dict[str, float], notes: Iterable[str] = ()) -> None:
    folder = Path(folder)
    cls = type(model).__name__
    data = recipe.get("data", {})
    lines = [
        f"# {cls} trained with latent_vae",
        "",
        f"A stock `diffusers.{cls}`: load it with plain diffusers, no custom code.",
        "",
        "```python",
        f"from diffusers import {cls}",
        f'vae = {cls}.from_pretrained("{folder.name}")',
        "```",
        "",
        "## Model",
        "",
        f"- preset: `{recipe.get('model', {}).get('preset')}`"
        + (f", initialised from `{recipe['model']['pretrained']}`" if recipe.get("model", {}).get("pretrained") else ""),
        f"- parameters: {count_parameters(model):,}",
        f"- downsampling factor: {downsample_factor(model)}, latent channels: {latent_channels(model)}",
        f"- scaling_factor: {model.config.scaling_factor:.6g}",
    ]
    if is_vq(model):
        lines.append(f"- codebook: {model.config.num_vq_embeddings} codes of dim {latent_channels(model)}")
    lines += [
        "",
        "## Training",
        "",
        f"- steps: {steps}",
        f"- data: `{data.get('path') or 'scikit-image sample photos'}` at {data.get('resolution')}px",
        f"- written: {time.strftime('%Y-%m-%d %H:%M')}",
        "- the full resolved recipe is `../config.yaml` in the run directory",
        "",
        "## Validation",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    else:
        lines.append("No validation set was used.")
    notes = list(notes)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
