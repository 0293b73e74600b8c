"""Latent regularisers: the only part of the objective that differs between KL and VQ models.

A regulariser takes the encoder's output and returns the latents the decoder consumes,
its (already weighted) contribution to the generator loss, and named values to log.

Reduction convention (``reconstruction.reduction``), shared with the reconstruction term:
``sum``  — summed over all latent elements (C·h·w), averaged over the batch (latent-diffusion);
``mean`` — averaged over all elements (taming-transformers).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import KLConfig
from .base import RegularizerOutput, reduce_elements


def kl_weight_at(step: int, cfg: KLConfig) -> float:
    """The KL weight β at a training step under ``regularizer.kl.schedule``.

    constant: β. linear: β·min(1, step / warmup_steps) (KL annealing, Bowman et al. 2016).
    cyclical: within each cycle of ``cycle_steps``, β rises linearly over the first
    ``cycle_ratio`` of the cycle and stays at β for the rest (Fu et al. 2019).
    """
    if cfg.schedule == "linear" and cfg.warmup_steps > 0:
        return cfg.weight * min(1.0, step / cfg.warmup_steps)
    if cfg.schedule == "cyclical":
        phase = (step % cfg.cycle_steps) / cfg.cycle_steps
        return cfg.weight * min(1.0, phase / cfg.cycle_ratio)
    return cfg.weight


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) per element: ½ (μ² + σ² − 1 − log σ²)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def channel_activity(posterior_mean: torch.Tensor) -> torch.Tensor:
    """Per latent channel: variance of the posterior mean across inputs, averaged over positions.

    A channel is an *active unit* when this exceeds ``ACTIVE_UNIT_THRESHOLD`` (Burda et al.
    2016 use 0.01): its code depends on the input. A collapsed channel carries no information.
    """
    if posterior_mean.shape[0] < 2:
        return torch.zeros(posterior_mean.shape[1], device=posterior_mean.device)
    return posterior_mean.float().var(dim=0, unbiased=True).mean(dim=(1, 2))


ACTIVE_UNIT_THRESHOLD = 0.01


class KLRegularizer(nn.Module):
    """KL(q(z|x) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), log σ² clamped to [−30, 20] by diffusers.

    With ``regularizer.kl.free_bits`` > 0 each latent channel's KL (per element, batch mean) is floored at
    that many nats, so channels below the floor get no gradient from the KL term
    (Kingma et al. 2016) — a guard against posterior collapse at large β.
    """

    def __init__(self, cfg: KLConfig, reduction: str):
        super().__init__()
        self.cfg, self.reduction = cfg, reduction

    def forward(self, posterior, noise: Optional[torch.Tensor], step: int) -> RegularizerOutput:
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        latents = posterior.mean if noise is None else posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        kl = gaussian_kl(mean, logvar)  # (B, C, h, w)
        kl_per_channel = kl.mean(dim=(0, 2, 3))  # nats per latent element, by channel
        if self.cfg.free_bits > 0:
            floored = torch.clamp(kl_per_channel, min=self.cfg.free_bits)
            spatial = kl.shape[2] * kl.shape[3]
            kl_loss = floored.sum() * spatial if self.reduction == "sum" else floored.mean()
        else:
            kl_loss = reduce_elements(kl, self.reduction)
        weight = kl_weight_at(step, self.cfg)
        logs = {
            "kl": reduce_elements(kl.detach(), self.reduction),
            "kl_weight": weight,
            "kl_per_channel": kl_per_channel.detach(),
            "channel_activity": channel_activity(mean.detach()),
        }
        return RegularizerOutput(latents=latents, loss=weight * kl_loss, logs=logs)
