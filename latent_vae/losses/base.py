"""What every loss term shares: the reduction convention, and what a latent regulariser returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import nn


def reduce_elements(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over non-batch dims and mean over the batch (``sum``), or mean over everything."""
    if reduction == "sum":
        return values.sum() / values.shape[0]
    return values.mean()


@dataclass
class RegularizerOutput:
    latents: torch.Tensor
    loss: torch.Tensor
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)


class NoRegularizer(nn.Module):
    """``regularizer.kind=none`` (an AutoencoderTiny): its deterministic latents go to the decoder as they
    are, and nothing is added to the loss."""

    def forward(self, latents: torch.Tensor, step: int = 0) -> RegularizerOutput:
        return RegularizerOutput(latents, torch.zeros((), device=latents.device))
