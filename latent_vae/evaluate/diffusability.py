"""How easily a diffusion model learns a tokenizer's latents (GUIDE §6): spectrum, equivariance,
channel statistics.

- **Spectrum** (Skorokhodov et al. 2025): the 2D power spectrum |FFT|² of each latent channel
  (per-image channel mean removed, so DC carries nothing), averaged over channels and images,
  beside the same for the RGB images downscaled (area) to the latent grid. The scalar
  ``hf_fraction`` is the share of power at radial frequencies above half the Nyquist frequency
  (|f| > 0.25 cycles/sample, grid corners included): white noise gives 1 − π/16 ≈ 0.80, natural
  images far less. The radial profile is the mean power in each annulus of width Nyquist/bins,
  divided by the mean over all non-DC frequencies (a flat spectrum is 1 everywhere).
- **Equivariance** (EQ-VAE's measure): for each transform τ (``losses.equivariance``: ×0.5 and
  ×0.75 antialiased bilinear downscales, 90/180/270° rotations, horizontal flip), the PSNR of
  decode(τ(encode(x))) against τ(x), capped at ``PSNR_CAP`` dB so an exact map stays finite and
  JSON-safe; and the latent-space error ‖encode(τ(x)) − τ(encode(x))‖ / ‖τ(encode(x))‖ over the
  set (for flips and rotations the denominator is ‖encode(x)‖).
- **Channels**: per-channel mean and std of the latents, raw and as the diffusion model sees them
  (``models.stock.to_diffusion_latents``), and the channel correlation matrix.

Latents are ``models.stock.encoder_latents`` (KL posterior mean, VQ pre-quantisation latents);
decoding is ``model.decode`` (a VQ model quantises inside). Every sum is float64 and reduced over
processes in ``result()``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_sum_
from ..losses.equivariance import transform_pair
from ..models.stock import Autoencoder, encoder_latents, latent_channels, to_diffusion_latents
from .metrics import psnr_per_image

TRANSFORMS = ("scale_0.5", "scale_0.75", "rot90", "rot180", "rot270", "hflip")
PSNR_CAP = 100.0  # dB: an MSE of 1e-10 on [0, 1] images; identical images would give +inf
HALF_NYQUIST = 0.25  # cycles per sample


def radial_frequency(height: int, width: int, device=None) -> torch.Tensor:
    """|f| in cycles per sample of every FFT bin of an (height, width) grid (Nyquist = 0.5)."""
    fy, fx = torch.fft.fftfreq(height, device=device), torch.fft.fftfreq(width, device=device)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).double()


def power_spectrum(tensors: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> |FFT2|² of each channel with its mean removed, float64, same shape."""
    x = tensors.double()
    return torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().pow(2)


def high_frequency_fraction(tensors: torch.Tensor) -> torch.Tensor:
    """Per item (N,): the share of (channel-summed) power above half the Nyquist frequency."""
    power = power_spectrum(tensors).sum(dim=1)  # (N, h, w)
    high = radial_frequency(*power.shape[-2:], device=power.device) > HALF_NYQUIST
    return (power * high).sum(dim=(-2, -1)) / power.sum(dim=(-2, -1)).clamp(min=1e-300)


def radial_profile(power: torch.Tensor, bins: int) -> torch.Tensor:
    """Mean power (h, w) in ``bins`` annuli from 0 to Nyquist, over the mean non-DC power."""
    radius = radial_frequency(*power.shape, device=power.device)
    index = torch.clamp(torch.ceil(radius / 0.5 * bins).long() - 1, min=0)
    inside = (radius > 0) & (radius <= 0.5)
    sums = torch.zeros(bins, dtype=torch.float64, device=power.device).index_add_(0, index[inside], power[inside])
    counts = torch.zeros_like(sums).index_add_(0, index[inside], torch.ones_like(power[inside]))
    reference = power[radius > 0].mean().clamp(min=1e-300)
    return sums / counts.clamp(min=1) / reference


class SpectrumStatistics:
    """Summed power spectra of a stream of (N, C, h, w) batches (one grid size)."""

    def __init__(self):
        self.power: Optional[torch.Tensor] = None

    def update(self, tensors: torch.Tensor) -> None:
        power = power_spectrum(tensors).sum(dim=(0, 1))
        self.power = power if self.power is None else self.power + power

    def result(self) -> Dict[str, Any]:
        """Collective: the total power is summed over processes first."""
        power = all_reduce_sum_(self.power)
        high = radial_frequency(*power.shape, device=power.device) > HALF_NYQUIST
        bins = max(1, min(power.shape) // 2)
        return {"hf_fraction": float((power * high).sum() / power.sum().clamp(min=1e-300)),
                "profile": radial_profile(power, bins).tolist(),
                "frequencies": [(i + 1) / bins for i in range(bins)]}  # annulus outer edges, × Nyquist


class ChannelStatistics:
    """Per-channel sums (count, Σz, Σzzᵀ) of latents over positions and images, float64."""

    def __init__(self, channels: int, device):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64, device=device)

    def update(self, latents: torch.Tensor) -> None:
        flat = latents.double().transpose(0, 1).flatten(1)  # (C, N·h·w)
        self.count += flat.shape[1]
        self.sum += flat.sum(dim=1)
        self.outer += flat @ flat.T

    def result(self) -> Dict[str, Any]:
        count = float(all_reduce_sum_(self.count))
        mean = all_reduce_sum_(self.sum) / max(count, 1.0)
        covariance = all_reduce_sum_(self.outer) / max(count, 1.0) - torch.outer(mean, mean)
        std = covariance.diagonal().clamp(min=0).sqrt()
        correlation = covariance / torch.outer(std, std).clamp(min=1e-300)
        return {"mean": mean.tolist(), "std": std.tolist(), "correlation": correlation.tolist()}


def _frobenius_squared(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double().pow(2).sum()


class DiffusabilityStatistics:
    """The diffusability measurements of one tokenizer over a stream of image batches.

    ``encode`` / ``decode`` map images in [-1, 1] to latents and back; ``update`` returns the
    per-image values (``latent_hf_fraction``, ``eq_psnr_<transform>``) for a per-image table.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                 channels: int, device, transforms: Sequence[str] = TRANSFORMS,
                 scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.encode, self.decode, self.transforms, self.scale = encode, decode, tuple(transforms), scale
        self.latent_spectrum, self.image_spectrum = SpectrumStatistics(), SpectrumStatistics()
        self.raw = ChannelStatistics(channels, device)
        self.scaled = ChannelStatistics(channels, device) if scale is not None else None
        # per transform: Σ PSNR, Σ‖enc(τx) − τ(enc x)‖², Σ‖τ(enc x)‖²; and the image count
        self.sums = torch.zeros(len(self.transforms), 3, dtype=torch.float64, device=device)
        self.images = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        latents = self.encode(images).float()
        self.latent_spectrum.update(latents)
        self.image_spectrum.update(F.interpolate(images.float(), size=latents.shape[-2:], mode="area"))
        self.raw.update(latents)
        if self.scaled is not None:
            self.scaled.update(self.scale(latents))
        self.images += len(images)
        per_image = {"latent_hf_fraction": high_frequency_fraction(latents).float()}
        for row, name in enumerate(self.transforms):
            target, moved = transform_pair(name, images.float(), latents)
            psnr = psnr_per_image(self.decode(moved.to(latents.dtype)).float(), target).clamp(max=PSNR_CAP)
            encoded = self.encode(target.to(images.dtype)).float()
            self.sums[row] += torch.stack([psnr.double().sum(), _frobenius_squared(encoded - moved),
                                           _frobenius_squared(moved)])
            per_image[f"eq_psnr_{name}"] = psnr
        return per_image

    def result(self) -> Dict[str, Any]:
        """Collective (every process calls it): the set-level report."""
        sums, images = all_reduce_sum_(self.sums), float(all_reduce_sum_(self.images))
        latent, image = self.latent_spectrum.result(), self.image_spectrum.result()
        equivariance = {name: {"psnr": float(sums[row, 0]) / max(images, 1.0),
                               "latent_relative_error": math.sqrt(float(sums[row, 1] / sums[row, 2].clamp(min=1e-300)))}
                        for row, name in enumerate(self.transforms)}
        report = {
            "latent_hf_fraction": latent["hf_fraction"], "image_hf_fraction": image["hf_fraction"],
            "spectrum": {"frequencies": latent["frequencies"], "latent": latent["profile"], "image": image["profile"]},
            "equivariance": equivariance,
            "eq_psnr_mean": sum(v["psnr"] for v in equivariance.values()) / max(len(equivariance), 1),
            "channels": {"raw": self.raw.result()},
            "psnr_cap_db": PSNR_CAP,
        }
        if self.scaled is not None:
            scaled = self.scaled.result()
            report["channels"]["scaled"] = {"mean": scaled["mean"], "std": scaled["std"]}
        return report


def model_statistics(model: Autoencoder, device, transforms: Sequence[str] = TRANSFORMS) -> DiffusabilityStatistics:
    """``DiffusabilityStatistics`` of a stock diffusers autoencoder."""
    return DiffusabilityStatistics(lambda x: encoder_latents(model, x), lambda z: model.decode(z).sample,
                                   latent_channels(model), device, transforms,
                                   scale=lambda z: to_diffusion_latents(model, z))


def summary_metrics(report: Dict[str, Any]) -> Dict[str, float]:
    """The scalars of a report, flat (``metrics`` of an evaluation, validation logs)."""
    metrics = {"latent_hf_fraction": report["latent_hf_fraction"], "image_hf_fraction": report["image_hf_fraction"],
               "eq_psnr_mean": report["eq_psnr_mean"]}
    for name, values in report["equivariance"].items():
        metrics[f"eq_psnr_{name}"] = values["psnr"]
        metrics[f"eq_latent_error_{name}"] = values["latent_relative_error"]
    return metrics


def measure(model: Autoencoder, batches: Iterable[torch.Tensor], transforms: Sequence[str] = TRANSFORMS
            ) -> Dict[str, Any]:
    """The report of ``model`` over image batches in [-1, 1] (on the model's device), no gradients."""
    device = next(model.parameters()).device
    statistics = model_statistics(model, device, transforms)
    for batch in batches:
        statistics.update(batch.to(device))
    return statistics.result()


def plot_spectra(reports: Dict[str, Dict[str, Any]], path: Path) -> Path:
    """A matplotlib PNG: the radial power profile of each report's latents (solid) and of its
    images at the latent resolution (dashed), log scale; ``reports``: label -> report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=110)
    for label, report in reports.items():
        spectrum = report["spectrum"]
        line, = axis.plot(spectrum["frequencies"], spectrum["latent"], marker="o", markersize=3,
                          label=f"{label} latents (HF {report['latent_hf_fraction']:.3f})")
        axis.plot(spectrum["frequencies"], spectrum["image"], linestyle="--", color=line.get_color(),
                  label=f"{label} RGB at latent size (HF {report['image_hf_fraction']:.3f})")
    axis.axvline(0.5, color="grey", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_xlabel("radial frequency (fraction of Nyquist)")
    axis.set_ylabel("power / mean non-DC power")
    axis.set_title("radially averaged power spectrum")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
