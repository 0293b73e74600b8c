"""What an evaluation computes over the whole set rather than per image, merged across processes:
the code histogram (VQ: usage, perplexity), the moments of the posterior mean (KL: active units,
the posterior-collapse monitor) and the rFID feature statistics."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..distributed import all_gather_cat, all_reduce_sum_
from ..losses.kl import ACTIVE_UNIT_THRESHOLD
from ..losses.vq import codebook_statistics
from ..models.stock import Autoencoder, downsample_factor, is_vq, latent_channels
from .metrics import to_unit_range
from .networks import MetricNetworks
from .options import EvalOptions
from .report import EvalResult


class RunningMoments:
    """Mean and summed squared deviation per element over a stream of batches, in float64
    (Chan et al.'s pairwise update: no cancellation, mergeable across processes)."""

    def __init__(self, shape: Sequence[int], device: torch.device):
        self.count = 0
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self.m2 += m2 + delta.pow(2) * (self.count * count / total)
        self.count = total

    def update(self, batch: torch.Tensor) -> None:
        batch = batch.double()
        mean = batch.mean(dim=0)
        self._merge(batch.shape[0], mean, (batch - mean).pow(2).sum(dim=0))

    def merged_across_processes(self) -> "RunningMoments":
        counts = all_gather_cat(torch.tensor([self.count], device=self.mean.device))
        means, m2s = all_gather_cat(self.mean[None]), all_gather_cat(self.m2[None])
        merged = RunningMoments(self.mean.shape, self.mean.device)
        for count, mean, m2 in zip(counts.tolist(), means, m2s):
            merged._merge(count, mean, m2)
        return merged

    def variance(self) -> torch.Tensor:
        """Unbiased variance per element (zero with fewer than two samples)."""
        return self.m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self.m2)


def _fid_images(images: torch.Tensor, float_input: bool) -> torch.Tensor:
    unit = to_unit_range(images)
    return unit if float_input else unit.mul(255).round().to(torch.uint8)


class SetStatistics:
    """The set-level statistics of one evaluation: ``update`` per batch, ``finish`` once (collective)."""

    def __init__(self, model: Autoencoder, options: EvalOptions, networks: MetricNetworks, device: torch.device):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.vq, self.float_input = is_vq(model), networks.fid_float_input
        size = options.resolution // downsample_factor(model)
        self.code_counts = torch.zeros(model.config.num_vq_embeddings if self.vq else 0, dtype=torch.long,
                                       device=device)
        self.moments = RunningMoments((latent_channels(model), size, size), device)
        self.fid = None
        if networks.fid_extractor is not None:
            self.fid = FrechetInceptionDistance(feature=networks.fid_extractor, normalize=self.float_input,
                                                input_img_size=(3, options.resolution, options.resolution)).to(device)

    def update(self, images: torch.Tensor, recon: torch.Tensor, extras: Dict[str, torch.Tensor]) -> None:
        if self.vq:
            self.code_counts += torch.bincount(extras["codes"].flatten(), minlength=self.code_counts.numel())
        elif "posterior_mean" in extras:  # KL models (an AutoencoderTiny has no posterior)
            self.moments.update(extras["posterior_mean"])
        if self.fid is not None:
            self.fid.update(_fid_images(images, self.float_input), real=True)
            self.fid.update(_fid_images(recon, self.float_input), real=False)

    def finish(self, result: EvalResult) -> None:
        """Fill rFID, the codebook or the collapse report into ``result`` (collective)."""
        if self.fid is not None:
            enough = result.images >= 2
            result.metrics["rfid"] = float(self.fid.compute()) if enough else None
            if not enough:
                result.warnings.append("rFID needs at least 2 images")
        if self.vq:
            all_reduce_sum_(self.code_counts)
            stats = codebook_statistics(self.code_counts)
            result.codebook = {"usage": float(stats["usage"]), "perplexity": float(stats["perplexity"]),
                               "codes_used": int((self.code_counts > 0).sum()),
                               "codebook_size": self.code_counts.numel()}
        elif result.per_image and "kl_per_channel" in result.per_image[0]:
            result.latent = _collapse_report(result.per_image, self.moments.merged_across_processes(),
                                             result.warnings)


def _collapse_report(rows: List[Dict[str, Any]], moments: RunningMoments, warnings: List[str]) -> Dict[str, Any]:
    """Per-channel KL and active units over the whole set (the posterior-collapse monitor)."""
    kl_per_channel = np.mean([r["kl_per_channel"] for r in rows], axis=0)
    activity = moments.variance().mean(dim=(1, 2)).float().cpu()
    active = int((activity > ACTIVE_UNIT_THRESHOLD).sum())
    channels = activity.numel()
    if len(rows) < 2:
        warnings.append("active units need at least 2 images")
    elif active < channels:
        warnings.append(f"only {active} of {channels} latent channels are active (posterior-mean variance "
                        f"> {ACTIVE_UNIT_THRESHOLD}): posterior collapse in the other channels")
    return {"kl": float(kl_per_channel.mean()), "kl_per_channel": kl_per_channel.tolist(),
            "channel_activity": activity.tolist(), "active_units": active, "channels": channels,
            "active_unit_threshold": ACTIVE_UNIT_THRESHOLD}
