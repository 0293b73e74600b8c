"""What an evaluation gives: ``EvalResult``, its JSON summary with the measurement protocol, the
per-image CSV, the reconstruction grid PNG and a few lines for the terminal."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..data.sources import Failure
from ..losses.kl import ACTIVE_UNIT_THRESHOLD

PROTOCOL = {
    "psnr": "per image on [0,1] (reconstruction clamped), 10*log10(1/MSE), averaged over images",
    "ssim": "per image, 11x11 Gaussian window (sigma 1.5), data_range 1, K1 0.01, K2 0.03 (torchmetrics), "
            "averaged over channels and images",
    "lpips": "per image, lpips 0.1 linear heads on the named ImageNet backbone, inputs in [-1,1]",
    "rfid": "Frechet distance between InceptionV3 features (torch-fidelity weights, TF1-compatible bilinear "
            "resize to 299) of the uint8 originals and reconstructions of the same images "
            "(torchmetrics); depends on the number of images: compare only equal protocols",
    "kl": "0.5*(mu^2+sigma^2-1-log sigma^2) per latent element (nats), averaged",
    "latent_hf_fraction": "share of the latents' power (FFT, per-channel mean removed) above half the Nyquist "
                          "frequency; image_hf_fraction: the same for the RGB images area-downscaled to the latent grid",
    "eq_psnr": "PSNR of decode(T(encode(x))) vs T(x) per transform T (x0.5/x0.75 antialiased bilinear, rotations, "
               "hflip), capped at 100 dB; eq_latent_error: ||enc(Tx) - T(enc x)|| / ||T(enc x)|| over the set",
    "active_units": f"latent channels whose posterior-mean variance across images, averaged over positions, "
                    f"exceeds {ACTIVE_UNIT_THRESHOLD}",
}


@dataclass
class EvalResult:
    model_class: str
    metrics: Dict[str, Optional[float]]
    per_image: List[Dict[str, Any]]
    failures: List[Failure]
    upscaled: int
    settings: Dict[str, Any]
    latent: Optional[Dict[str, Any]] = None
    codebook: Optional[Dict[str, Any]] = None
    diffusability: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)
    grid: Optional[np.ndarray] = None  # inputs above reconstructions, HWC uint8 (main process only)

    @property
    def images(self) -> int:
        return len(self.per_image)

    def summary(self) -> Dict[str, Any]:
        """Everything but the per-image rows and the grid: what the JSON file holds."""
        payload = {
            "model_class": self.model_class,
            "images": self.images,
            "metrics": self.metrics,
            "inputs": {"evaluated": self.images, "skipped": len(self.failures), "upscaled": self.upscaled},
            "skipped_inputs": [{"key": f.key, "reason": f.reason} for f in self.failures],
            "settings": self.settings,
            "protocol": PROTOCOL,
            "warnings": self.warnings,
        }
        if self.latent is not None:
            payload["latent"] = self.latent
        if self.codebook is not None:
            payload["codebook"] = self.codebook
        if self.diffusability is not None:
            payload["diffusability"] = self.diffusability
        return payload


def write_outputs(result: EvalResult, json_path: Optional[str | Path] = None,
                  csv_path: Optional[str | Path] = None, grid_path: Optional[str | Path] = None) -> None:
    """The JSON summary, the per-image CSV and the reconstruction grid PNG (those given)."""
    for path in (json_path, csv_path, grid_path):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result.summary(), indent=2) + "\n")
    if csv_path is not None:
        columns = [k for k in result.per_image[0] if k != "kl_per_channel"] if result.per_image else ["key"]
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(result.per_image)
    if grid_path is not None and result.grid is not None:
        from PIL import Image

        Image.fromarray(result.grid).save(grid_path)


def format_summary(result: EvalResult) -> str:
    """A few human-readable lines for the terminal."""
    lines = [f"{result.images} images ({len(result.failures)} skipped, {result.upscaled} upscaled)"]
    lines.append("  " + "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if v is not None))
    if result.latent:
        lines.append(f"  KL {result.latent['kl']:.4f} nats/element, active units "
                     f"{result.latent['active_units']}/{result.latent['channels']}")
    if result.codebook:
        lines.append(f"  codebook usage {result.codebook['usage']:.1%} ({result.codebook['codes_used']}/"
                     f"{result.codebook['codebook_size']}), perplexity {result.codebook['perplexity']:.1f}")
    lines += [f"  skipped {f.key}: {f.reason}" for f in result.failures[:20]]
    if len(result.failures) > 20:
        lines.append(f"  ... and {len(result.failures) - 20} more (see the JSON)")
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)
