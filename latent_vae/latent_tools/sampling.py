"""Decoding random latents: the prior, or a Gaussian fitted to encoded images.

Distributions (model latents z are what ``vae.decode`` consumes: ``models.stock.decoder_latents``):

- ``prior``: KL models: z ~ N(0, I), the prior the KL term pulls the posterior towards (the
  textbook VAE sample). VQ models: a code drawn uniformly at every position (the uniform
  prior of VQ-VAE), decoded from its codebook row.
- ``scaled-prior`` (KL only): N(0, I) in the scaled space a diffusion model works in, so
  z = ε / scaling_factor + shift_factor (per channel with latents_mean / latents_std). This is
  the scale of the data latents (scaling_factor = 1 / their std), which ``prior`` is not when
  the KL weight is small.
- ``fitted``: a Gaussian fitted to the model latents of given images, the same at every
  position: per-channel mean and variance (``diagonal``) or mean and C×C covariance across
  channels (``full``). VQ: fitted to the quantised latents; decoding snaps each position to
  its nearest code.

None of these models the dependence between positions, which is what a latent diffusion
model learns; docs/LATENT_TOOLS.md explains why the samples look like texture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..data.images import image_grid, to_pil
from ..data.sources import Failure, ImageSource
from ..errors import ConfigError, check_choice, check_positive
from ..models.stock import (
    Autoencoder,
    decoder_latents,
    downsample_factor,
    from_diffusion_latents,
    indices_to_latents,
    is_tiny,
    is_vq,
    latent_channels,
)
from .common import check_resolution, decode_latents, iter_batches, require_images, write_failures

DISTRIBUTIONS = ("prior", "scaled-prior", "fitted")
COVARIANCES = ("diagonal", "full")


def prior_latents(model: Autoencoder, count: int, size: Tuple[int, int], distribution: str = "prior",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``count`` model latents of spatial ``size`` (h, w) from the prior (module docstring), on the CPU."""
    height, width = size
    if is_tiny(model):
        raise ConfigError(f"--distribution {distribution} needs a KL model; an AutoencoderTiny has no prior "
                          "over its latents: use --distribution fitted (a Gaussian fitted to the latents of images)")
    if is_vq(model):
        if distribution != "prior":
            raise ConfigError(f"--distribution {distribution} needs a KL model; a VQModel has no Gaussian "
                              "prior: use --distribution prior (uniform codes) or fitted")
        codes = model.config.num_vq_embeddings
        indices = torch.randint(codes, (count, height, width), generator=generator)
        return indices_to_latents(model, indices.to(model.device)).cpu()
    noise = torch.randn(count, latent_channels(model), height, width, generator=generator)
    check_choice("--distribution", distribution, ("prior", "scaled-prior"))
    return from_diffusion_latents(model, noise) if distribution == "scaled-prior" else noise


@dataclass
class LatentGaussian:
    """N(mean, covariance) over the channels of one latent position, shared by all positions."""

    mean: torch.Tensor  # (C,) float64
    covariance: torch.Tensor  # (C, C) float64; diagonal for a per-channel fit
    kind: str
    fitted_on: int  # latent positions (images × h × w)

    def sample(self, count: int, size: Tuple[int, int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(count, C, h, w) float32 samples, positions independent."""
        height, width = size
        # covariance = Q Λ Qᵀ; Q √Λ maps N(0, I) onto it and, unlike Cholesky, accepts singular fits.
        eigenvalues, eigenvectors = torch.linalg.eigh(self.covariance)
        transform = eigenvectors * eigenvalues.clamp(min=0).sqrt()
        noise = torch.randn(count * height * width, self.mean.numel(), generator=generator, dtype=torch.float64)
        values = self.mean + noise @ transform.T
        return values.reshape(count, height, width, -1).permute(0, 3, 1, 2).float().contiguous()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "fitted_on_positions": self.fitted_on, "mean": self.mean.tolist(),
                "covariance": self.covariance.tolist()}


def fit_gaussian(latents: torch.Tensor, covariance: str = "diagonal") -> LatentGaussian:
    """Gaussian over channels from latents (N, C, h, w), pooling all images and positions."""
    check_choice("--covariance", covariance, COVARIANCES)
    values = latents.detach().double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).cpu()
    if values.shape[0] < 2:
        raise ConfigError("fitting a Gaussian needs at least two latent positions")
    full = torch.cov(values.T).reshape(values.shape[1], values.shape[1])
    fitted = full if covariance == "full" else torch.diag(torch.diagonal(full))
    return LatentGaussian(values.mean(dim=0), fitted, covariance, values.shape[0])


def fit_to_images(model: Autoencoder, source: ImageSource, resolution: int, covariance: str = "diagonal",
                  batch_size: int = 8) -> Tuple[LatentGaussian, List[Failure]]:
    """``fit_gaussian`` on the model latents of every readable image of ``source``."""
    latents, failures = [], []
    for batch in iter_batches(source, resolution, batch_size, desc="encode"):
        failures += batch.failures
        if batch.pixels is not None:
            with torch.no_grad():
                latents.append(decoder_latents(model, batch.pixels.to(model.device)).cpu())
    latents = require_images(torch.cat(latents) if latents else None, failures, 1, "fitting a Gaussian")
    return fit_gaussian(latents, covariance), failures


@dataclass
class SampleResult:
    grid: Path
    files: List[Path]
    latents: torch.Tensor  # the model latents decoded, (count, C, h, w)
    gaussian: Optional[LatentGaussian]
    failures: List[Failure]


def write_samples(model: Autoencoder, output_dir: str | Path, resolution: int, count: int = 16,
                  distribution: str = "prior", source: Optional[ImageSource] = None,
                  covariance: str = "diagonal", seed: int = 0, batch_size: int = 8,
                  known_failures: Sequence[Failure] = ()) -> SampleResult:
    """Decode ``count`` samples; write ``samples_grid.png``, ``samples/NNNNN.png`` and, for a
    fitted Gaussian, ``fitted_gaussian.json`` (its mean and covariance) and ``unreadable.csv``
    (``known_failures`` and fitting images that failed to decode)."""
    check_choice("--distribution", distribution, DISTRIBUTIONS)
    if (source is not None) != (distribution == "fitted"):
        raise ConfigError("images are used only to fit a Gaussian: give images with --distribution fitted, "
                          "none with prior or scaled-prior")
    check_positive("--count", count)
    check_resolution(model, resolution)
    size = (resolution // downsample_factor(model),) * 2
    generator = torch.Generator().manual_seed(seed)
    gaussian, failures = None, list(known_failures)
    if distribution == "fitted":
        gaussian, read_failures = fit_to_images(model, source, resolution, covariance, batch_size)
        failures += read_failures
        latents = gaussian.sample(count, size, generator)
    else:
        latents = prior_latents(model, count, size, distribution, generator)
    images = decode_latents(model, latents, batch_size)

    output_dir = Path(output_dir)
    (output_dir / "samples").mkdir(parents=True, exist_ok=True)
    files = []
    for index, image in enumerate(images):
        files.append(output_dir / "samples" / f"{index:05d}.png")
        to_pil(image).save(files[-1])
    grid = output_dir / "samples_grid.png"
    image_grid(images, columns=math.ceil(math.sqrt(count))).save(grid)
    if gaussian is not None:
        (output_dir / "fitted_gaussian.json").write_text(json.dumps(gaussian.to_dict(), indent=2) + "\n")
    write_failures(failures, output_dir / "unreadable.csv")
    return SampleResult(grid, files, latents, gaussian, failures)
