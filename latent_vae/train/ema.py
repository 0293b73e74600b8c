"""Exponential moving average of model weights (what is usually exported)."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


class EMA(nn.Module):
    """``shadow ← decay·shadow + (1 − decay)·weights`` after every optimiser step.

    The shadow is a full copy of the model (a stock diffusers module), so it can be
    evaluated and saved with ``save_pretrained`` as is. Only floating-point parameters are
    averaged; buffers are copied. The effective decay warms up as ``min(decay, (1+n)/(10+n))``
    so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        """One update, computed on the device (no host synchronisation). ``skip`` (0 or 1, a
        tensor): 1 leaves the average and its count unchanged, for a step that was skipped."""
        count = self.num_updates.float()
        decay = torch.clamp((1 + count) / (10 + count), max=self.decay)
        keep = torch.ones_like(decay) if skip is None else 1 - skip.to(decay.dtype)
        shadow_params = [p for p in self.shadow.parameters() if p.dtype.is_floating_point]
        params = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
        weight = (1 - decay) * keep  # a tensor per parameter: a Python-scalar weight would be read on the host
        torch._foreach_lerp_(shadow_params, params, [weight] * len(shadow_params))
        for shadow_buffer, buffer in zip(self.shadow.buffers(), model.buffers()):
            shadow_buffer.copy_(buffer)
        self.num_updates += keep.long()
