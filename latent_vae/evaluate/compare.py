"""Is autoencoder B a drop-in replacement for A under a diffusion model trained on A's latents?

A latent diffusion model learns the distribution of A's *scaled* latents — what a diffusers
pipeline feeds its denoiser: ``(z − shift_factor) · scaling_factor`` (or, with per-channel
``latents_mean``/``latents_std`` in the config, ``(z − mean) · scaling_factor / std``), with z the
posterior mean (KL) or the pre-quantisation latent (VQ, as latent-diffusion's VQ models). Two
measurements decide whether B can take A's place:

- **latent drift**: how far B's scaled latents of the same images are from A's, relative to
  their size (``scaled_relative_l2``), and how each channel's mean and std moved. Encoding
  with B (img2img, inpainting, training the diffusion model further) feeds it these latents.
- **cross-decoding**: B's decoder applied to A's latents — exactly what a text-to-image run
  with B produces from a diffusion model that generates A-like latents.

Verdict thresholds, in units of the scaled latents (unit std, the diffusion model's data scale):
``DROP_IN_DRIFT`` = 0.03 is the smallest noise std the Stable Diffusion sampler ever adds
(√(1 − ᾱ₁) = 0.029 for the scaled-linear β schedule): a perturbation below it is buried in
noise the denoiser handles at its very last step. ``CHECK_DRIFT`` = 0.15 is the noise std of
the last 2% of the schedule (√(1 − ᾱ₂₀) ≈ 0.13): up to there, the drift only touches the finest
detail, which the last denoising steps decide — look at samples. Beyond it, the denoiser sees
latents unlike its training data at noise levels where structure is decided: fine-tune the
diffusion model on B's latents, or fine-tune only A's decoder instead (encoder frozen, drift 0).
The same bounds apply to per-channel mean shifts and to |std ratio − 1|. Cross-decoding may
lose at most ``CROSS_DECODE_TOLERANCE_DB`` PSNR against A's own reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch

from ..data.sources import Failure, ImageSource
from ..distributed import all_reduce_sum_, process_state
from ..errors import IncompatibleVAE
from ..models.stock import (
    Autoencoder,
    encoder_latents,
    from_diffusion_latents,
    latent_channels,
    to_diffusion_latents,
)
from ..models.tiling import tiling
from ..runtime import autocast
from .dataset import eval_loader
from .evaluation import evaluate
from .metrics import psnr_per_image, ssim_per_image
from .networks import MetricNetworks, build_metric_networks
from .options import EvalOptions
from .report import EvalResult
from .statistics import RunningMoments

DROP_IN_DRIFT = 0.03
CHECK_DRIFT = 0.15
CROSS_DECODE_TOLERANCE_DB = 0.5


# --------------------------------------------------------------------------- latents


class LatentDrift:
    """Streaming latent drift of model B against model A over batches of images."""

    def __init__(self, channels: int, device: torch.device):
        # ‖z_b − z_a‖², ‖z_a‖², and the same for the scaled latents s
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.images = 0
        self.moments_a = RunningMoments((channels,), device)  # per-channel moments of the scaled latents
        self.moments_b = RunningMoments((channels,), device)

    def update(self, latents_a: torch.Tensor, latents_b: torch.Tensor,
               scaled_a: torch.Tensor, scaled_b: torch.Tensor) -> None:
        a, b, sa, sb = (t.double() for t in (latents_a, latents_b, scaled_a, scaled_b))
        self.sums += torch.stack([(b - a).pow(2).sum(), a.pow(2).sum(), (sb - sa).pow(2).sum(), sa.pow(2).sum()])
        self.moments_a.update(sa.permute(0, 2, 3, 1).reshape(-1, sa.shape[1]))
        self.moments_b.update(sb.permute(0, 2, 3, 1).reshape(-1, sb.shape[1]))
        self.images += a.shape[0]

    def result(self) -> Dict[str, Any]:
        """Drift over all processes (collective: every process must call it)."""
        sums = all_reduce_sum_(torch.cat([self.sums, self.sums.new_tensor([self.images])]))
        moments_a = self.moments_a.merged_across_processes()
        moments_b = self.moments_b.merged_across_processes()
        mean_a, mean_b = moments_a.mean, moments_b.mean
        std_a, std_b = moments_a.variance().sqrt(), moments_b.variance().sqrt()
        mean_shift, std_ratio = mean_b - mean_a, std_b / std_a.clamp(min=1e-12)
        return {
            "images": int(sums[4]),
            "relative_l2": float((sums[0] / sums[1].clamp(min=1e-30)).sqrt()),
            "scaled_relative_l2": float((sums[2] / sums[3].clamp(min=1e-30)).sqrt()),
            "channel_mean_a": mean_a.tolist(), "channel_mean_b": mean_b.tolist(),
            "channel_std_a": std_a.tolist(), "channel_std_b": std_b.tolist(),
            "channel_mean_shift": mean_shift.tolist(), "channel_std_ratio": std_ratio.tolist(),
            "max_abs_mean_shift": float(mean_shift.abs().max()),
            "max_abs_std_ratio_change": float((std_ratio - 1).abs().max()),
        }


@torch.no_grad()
def latent_shapes_match(model_a: Autoencoder, model_b: Autoencoder, resolution: int = 64) -> bool:
    """Whether both models map an image to latents of the same shape (channels and grid)."""
    probe = torch.zeros(1, 3, resolution, resolution)
    shapes = [encoder_latents(m, probe.to(next(m.parameters()).device, next(m.parameters()).dtype)).shape
              for m in (model_a, model_b)]
    return shapes[0] == shapes[1]


@torch.no_grad()
def latent_drift(model_a: Autoencoder, model_b: Autoencoder,
                 images: Union[torch.Tensor, Iterable[torch.Tensor]]) -> Dict[str, Any]:
    """Latent drift of B against A on images in [-1, 1] (a batch, or an iterable of batches).

    Returns ``relative_l2`` = ‖z_B − z_A‖ / ‖z_A‖ over all latents, ``scaled_relative_l2`` the same
    for the scaled latents the diffusion model sees, and per channel the mean and std of the
    scaled latents of each model, the mean shift (B − A) and the std ratio (B / A). Identical
    encoders give exactly 0. Both models are left on their devices; the images follow model A.
    """
    param_a, param_b = next(model_a.parameters()), next(model_b.parameters())
    drift = LatentDrift(latent_channels(model_a), param_a.device)
    for batch in ([images] if isinstance(images, torch.Tensor) else images):
        latents_a = encoder_latents(model_a, batch.to(param_a.device, param_a.dtype)).float()
        latents_b = encoder_latents(model_b, batch.to(param_b.device, param_b.dtype)).float().to(latents_a.device)
        if latents_a.shape != latents_b.shape:
            raise IncompatibleVAE(f"latent shapes differ: A {tuple(latents_a.shape[1:])}, B {tuple(latents_b.shape[1:])}")
        drift.update(latents_a, latents_b, to_diffusion_latents(model_a, latents_a),
                     to_diffusion_latents(model_b, latents_b))
    return drift.result()


# --------------------------------------------------------------------------- comparison


@dataclass
class Verdict:
    level: str  # "drop-in", "check samples", "not a drop-in", "incompatible"
    reasons: List[str] = field(default_factory=list)

    @property
    def drop_in(self) -> bool:
        return self.level == "drop-in"

    def text(self) -> str:
        head = {
            "drop-in": "B can replace A under a diffusion model trained on A's latents.",
            "check samples": "B can probably replace A, but generate samples with both and compare "
                             "before switching.",
            "not a drop-in": "B cannot replace A without fine-tuning the diffusion model on B's latents.",
            "incompatible": "B cannot replace A: its latents have a different shape.",
        }[self.level]
        return " ".join([head, *self.reasons])


def judge(drift: Optional[Dict[str, Any]], cross_psnr: Optional[float], psnr_a: Optional[float]) -> Verdict:
    """The plain-language verdict from the drift and cross-decoding numbers (thresholds: module doc)."""
    if drift is None:
        return Verdict("incompatible")
    worst = max(drift["scaled_relative_l2"], drift["max_abs_mean_shift"], drift["max_abs_std_ratio_change"])
    level = "drop-in" if worst <= DROP_IN_DRIFT else "check samples" if worst <= CHECK_DRIFT else "not a drop-in"
    reasons = [f"Latent drift {drift['scaled_relative_l2']:.4f} (relative L2 of scaled latents; largest "
               f"channel mean shift {drift['max_abs_mean_shift']:.4f}, std change "
               f"{drift['max_abs_std_ratio_change']:.4f}) against the bounds {DROP_IN_DRIFT} (drop-in) "
               f"and {CHECK_DRIFT} (check samples)."]
    if cross_psnr is not None and psnr_a is not None:
        loss = psnr_a - cross_psnr
        reasons.append(f"B's decoder on A's latents: PSNR {cross_psnr:.2f} dB vs A's own {psnr_a:.2f} dB.")
        if loss > CROSS_DECODE_TOLERANCE_DB and level != "not a drop-in":
            level = "check samples" if level == "drop-in" else level
            reasons.append(f"B decodes A's latents {loss:.2f} dB worse than A does: generated images would "
                           "lose quality.")
    return Verdict(level, reasons)


@dataclass
class Comparison:
    eval_a: EvalResult
    eval_b: EvalResult
    drift: Optional[Dict[str, Any]]
    cross_decode: Optional[Dict[str, float]]
    verdict: Verdict

    def summary(self) -> Dict[str, Any]:
        return {
            "a": {"metrics": self.eval_a.metrics, "latent": self.eval_a.latent, "codebook": self.eval_a.codebook},
            "b": {"metrics": self.eval_b.metrics, "latent": self.eval_b.latent, "codebook": self.eval_b.codebook},
            "images": self.eval_a.images,
            "skipped_inputs": [{"key": f.key, "reason": f.reason} for f in self.eval_a.failures],
            "latent_drift": self.drift,
            "cross_decode": self.cross_decode,
            "verdict": {"level": self.verdict.level, "drop_in": self.verdict.drop_in, "text": self.verdict.text(),
                        "thresholds": {"drop_in_drift": DROP_IN_DRIFT, "check_drift": CHECK_DRIFT,
                                       "cross_decode_tolerance_db": CROSS_DECODE_TOLERANCE_DB}},
            "settings": self.eval_a.settings,
        }


@torch.no_grad()
def _drift_and_cross_decode(model_a: Autoencoder, model_b: Autoencoder, source: ImageSource,
                            options: EvalOptions):
    """Latent drift of B against A, and PSNR/SSIM of B's decoder on A's latents (sharded over processes)."""
    state = process_state()
    shard = range(state.process_index, len(source), state.num_processes)
    drift = LatentDrift(latent_channels(model_a), state.device)
    sums = torch.zeros(3, dtype=torch.float64, device=state.device)  # PSNR, SSIM, images
    tile = (options.tiled, options.tile_size, options.tile_overlap)
    for batch in eval_loader(source, shard, options, state.device):
        if batch["pixel_values"] is None:
            continue
        images = batch["pixel_values"].to(state.device)
        with tiling(model_a, *tile), tiling(model_b, *tile), autocast(state.device, options.precision):
            latents_a, latents_b = encoder_latents(model_a, images).float(), encoder_latents(model_b, images).float()
            scaled_a = to_diffusion_latents(model_a, latents_a)
            drift.update(latents_a, latents_b, scaled_a, to_diffusion_latents(model_b, latents_b))
            cross = model_b.decode(from_diffusion_latents(model_b, scaled_a)).sample.float()
        sums += torch.stack([psnr_per_image(cross, images).sum(), ssim_per_image(cross, images).sum(),
                             torch.tensor(float(len(images)), device=images.device)]).double()
    all_reduce_sum_(sums)
    count = max(float(sums[2]), 1.0)
    return drift.result(), {"psnr": float(sums[0]) / count, "ssim": float(sums[1]) / count}


def compare(model_a: Autoencoder, model_b: Autoencoder, source: ImageSource,
            options: Optional[EvalOptions] = None, networks: Optional[MetricNetworks] = None,
            failures: Sequence[Failure] = ()) -> Comparison:
    """Reconstruction metrics of A and B on the same images, B's latent drift against A, the verdict."""
    options = options or EvalOptions()
    networks = networks if networks is not None else build_metric_networks(options)
    eval_a = evaluate(model_a, source, options, networks, failures)
    eval_b = evaluate(model_b, source, options, networks, failures)
    if options.limit is not None:
        source = source.subset(range(min(options.limit, len(source))))
    if not latent_shapes_match(model_a, model_b, options.resolution):
        return Comparison(eval_a, eval_b, None, None, judge(None, None, None))
    drift, cross = _drift_and_cross_decode(model_a, model_b, source, options)
    return Comparison(eval_a, eval_b, drift, cross, judge(drift, cross["psnr"], eval_a.metrics.get("psnr")))


def format_comparison(comparison: Comparison) -> str:
    rows = [f"{'metric':<12}{'A':>12}{'B':>12}"]
    for name, value_a in comparison.eval_a.metrics.items():
        value_b = comparison.eval_b.metrics.get(name)
        if value_a is not None and value_b is not None:
            rows.append(f"{name:<12}{value_a:>12.4f}{value_b:>12.4f}")
    if comparison.drift is not None:
        rows.append(f"latent drift: relative L2 {comparison.drift['relative_l2']:.4f}, scaled "
                    f"{comparison.drift['scaled_relative_l2']:.4f}; channel mean shift "
                    + ", ".join(f"{v:+.3f}" for v in comparison.drift["channel_mean_shift"])
                    + "; std ratio " + ", ".join(f"{v:.3f}" for v in comparison.drift["channel_std_ratio"]))
    rows.append(f"verdict ({comparison.verdict.level}): {comparison.verdict.text()}")
    return "\n".join(rows)

