"""What a tokenizer does to an image, at a glance.

For each image: its latent channels as greyscale images and a PCA-to-RGB rendering of the
latent next to the input and its reconstruction. Over all images: per-channel histograms of
the scaled latents against the N(0, 1) density, and their statistics as CSV.

Latents are the model latents (``models.stock.decoder_latents``): KL posterior means, VQ quantised latents (so a VQ
model shows the codes its decoder actually receives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import image_grid
from ..data.sources import Failure, ImageSource
from ..evaluate.diffusability import measure, plot_spectra
from ..models.stock import Autoencoder, decoder_latents, downsample_factor, to_diffusion_latents
from .common import (
    check_resolution,
    decode_latents,
    load_images,
    require_images,
    unique_stems,
    write_csv,
    write_failures,
)

# Histograms of at most this many channels are drawn (a 256-channel bottleneck would be unreadable).
MAX_HISTOGRAMS = 32
# Robust colour range of the PCA rendering: these quantiles of each component map to 0 and 1.
PCA_QUANTILES = (0.01, 0.99)
_QUANTILE_POSITIONS = 1 << 20  # torch.quantile's input limit is 2**24; a strided subset is plenty


def normalize_channels(latent: torch.Tensor) -> torch.Tensor:
    """One latent (C, h, w) -> (C, h, w) in [0, 1], each channel min-max scaled (a constant one is 0.5)."""
    flat = latent.float().flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low).clamp(min=1e-12)
    scaled = (flat - low[:, None]) / span[:, None]
    scaled[high - low < 1e-12] = 0.5
    return scaled.reshape(latent.shape)


def upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, h·factor, w·factor), nearest neighbour: one latent = one block of pixels."""
    return F.interpolate(images.float(), scale_factor=factor, mode="nearest")


def channel_grid(latent: torch.Tensor, factor: int):
    """One latent (C, h, w) as a grid of greyscale tiles, row by row in channel order, each tile
    the channel upscaled ×``factor`` (the input's size for factor = downsampling factor)."""
    tiles = upscale(normalize_channels(latent)[:, None], factor).expand(-1, 3, -1, -1)
    return image_grid(tiles * 2 - 1, columns=math.ceil(math.sqrt(latent.shape[0])))


def pca_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Latents (N, C, h, w) -> (N, 3, h, w) in [0, 1]: the first three principal components of
    the channel vectors, fitted over all positions of all N latents (so colours mean the same in
    every image), each mapped to [0, 1] between its PCA_QUANTILES. Components a latent with
    fewer than three channels lacks are 0.5.

    Component signs are fixed so that each component's largest loading is positive.
    """
    count, channels, height, width = latents.shape
    values = latents.detach().double().permute(0, 2, 3, 1).reshape(-1, channels).cpu()
    centred = values - values.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
    components = eigenvectors[:, eigenvalues.argsort(descending=True)[:3]]
    largest = components.abs().argmax(dim=0)
    components = components * torch.sign(components[largest, torch.arange(components.shape[1])])
    projected = centred @ components
    subset = projected[:: max(1, projected.shape[0] // _QUANTILE_POSITIONS)]
    low, high = (torch.quantile(subset, q, dim=0) for q in PCA_QUANTILES)
    rgb = torch.full((projected.shape[0], 3), 0.5, dtype=torch.float64)
    rgb[:, : components.shape[1]] = ((projected - low) / (high - low).clamp(min=1e-12)).clamp(0, 1)
    return rgb.reshape(count, height, width, 3).permute(0, 3, 1, 2).float()


def channel_statistics(scaled: torch.Tensor) -> List[Dict[str, float]]:
    """Per channel of scaled latents (N, C, h, w): mean, std, min, max and the fraction beyond ±3."""
    values = scaled.detach().double().transpose(0, 1).flatten(1).cpu()
    return [{"channel": c, "mean": v.mean().item(), "std": v.std().item(), "min": v.min().item(),
             "max": v.max().item(), "beyond_3": (v.abs() > 3).double().mean().item()}
            for c, v in enumerate(values)]


def histogram_figure(scaled: torch.Tensor, path: Path, bins: int = 60) -> Path:
    """One histogram (density) per channel of scaled latents, with the N(0, 1) density over it."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    all_values = scaled.detach().double().transpose(0, 1).flatten(1).cpu().numpy()
    values = all_values[:MAX_HISTOGRAMS]
    columns = min(4, len(values))
    rows = math.ceil(len(values) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.4 * rows), layout="constrained")
    span = max(4.0, float(np.quantile(np.abs(values), 0.995)))
    grid = np.linspace(-span, span, 400)
    normal = np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    for channel, channel_values in enumerate(values):
        axes = figure.add_subplot(rows, columns, channel + 1)
        axes.hist(channel_values, bins=bins, range=(-span, span), density=True, color="tab:blue", alpha=0.7)
        axes.plot(grid, normal, color="black", linewidth=1, label="N(0, 1)")
        axes.set_title(f"channel {channel}: mean {channel_values.mean():.2f}, std {channel_values.std():.2f}",
                       fontsize=9)
        axes.tick_params(labelsize=7)
    figure.axes[0].legend(fontsize=7)
    shown = "" if len(values) == len(all_values) else f" (first {len(values)} of {len(all_values)} channels)"
    figure.suptitle(f"scaled latents (z − shift)·scaling_factor vs N(0, 1){shown}", fontsize=10)
    figure.savefig(path, dpi=100)
    return path


@dataclass
class VisualizationResult:
    files: List[Path]
    statistics: List[Dict[str, float]]
    keys: List[str]
    failures: List[Failure]


def write_visualizations(model: Autoencoder, source: ImageSource, output_dir: str | Path,
                         resolution: int, known_failures: Sequence[Failure] = ()) -> VisualizationResult:
    """For each readable image ``<stem>_channels.png`` and ``<stem>_pca.png`` (input | reconstruction |
    PCA-RGB); over all of them ``histograms.png``, ``latent_stats.csv``, ``spectrum.png`` (latent vs
    RGB power spectrum, ``evaluate.diffusability``) and ``unreadable.csv``
    (``known_failures`` and inputs that failed to decode). Meant for a handful of images: all are
    held in memory, and the PCA is fitted over all of them."""
    check_resolution(model, resolution)
    keys, pixels, read_failures = load_images(source, resolution)
    failures = [*known_failures, *read_failures]
    pixels = require_images(pixels, failures, 1, "visualize")
    with torch.no_grad():
        latents = decoder_latents(model, pixels.to(model.device)).cpu()
    reconstructions = decode_latents(model, latents)
    factor = downsample_factor(model)
    colours = upscale(pca_rgb(latents), factor) * 2 - 1

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for stem, latent, image, reconstruction, colour in zip(unique_stems(keys), latents, pixels, reconstructions,
                                                           colours):
        files.append(output_dir / f"{stem}_channels.png")
        channel_grid(latent, factor).save(files[-1])
        files.append(output_dir / f"{stem}_pca.png")
        image_grid(torch.stack([image, reconstruction, colour]), columns=3).save(files[-1])
    scaled = to_diffusion_latents(model, latents)
    files.append(histogram_figure(scaled, output_dir / "histograms.png"))
    statistics = channel_statistics(scaled)
    files.append(write_csv(statistics, output_dir / "latent_stats.csv"))
    spectra = measure(model, [pixels.to(model.device)], transforms=())  # the spectrum alone: no extra passes
    files.append(plot_spectra({"model": spectra}, output_dir / "spectrum.png"))
    write_failures(failures, output_dir / "unreadable.csv")
    return VisualizationResult(files, statistics, keys, failures)

