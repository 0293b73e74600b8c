"""Exponential moving average of model weights (what is usually exported)."""

from __future__ import annotations

import copy
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
        self._count = None  # host copy of num_updates: reading the buffer each step would sync the GPU

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None

    def current_decay(self) -> float:
        if self._count is None:
            self._count = int(self.num_updates)
        return min(self.decay, (1 + self._count) / (10 + self._count))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        shadow_params = [p for p in self.shadow.parameters() if p.dtype.is_floating_point]
        params = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(shadow_params, params, weight)
        for shadow_buffer, buffer in zip(self.shadow.buffers(), model.buffers()):
            shadow_buffer.copy_(buffer)
        self.num_updates += 1
        self._count += 1
