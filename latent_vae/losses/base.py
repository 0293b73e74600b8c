"""What every loss term shares: the reduction convention, and what a latent regulariser returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch


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
