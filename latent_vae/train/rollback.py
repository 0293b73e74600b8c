"""A training step as a transaction: what it changes is kept only when the step is accepted.

A step changes more than the weights: both optimisers' moments and step counts, and state that
forward passes update before any verdict exists — the VQ codebook (EMA update, dead-code
restarts), its cluster statistics, usage counters and restart buffer, the LeCam anchors, the
discriminator's batch-norm statistics (``TrainState.step_tensors`` lists them all).
``StepSnapshot.save`` copies those tensors before the step; ``restore`` puts every one of them back,
bit for bit, when the processes' verdict (``guard.py``) says the step is bad. The verdict is a
device tensor and the restore is arithmetic on it, so neither waits for the device.

Cost: one copy of the listed tensors (weights and Adam moments of both models: about three times
the trained parameters) in memory, and a few passes over it per step.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

# Integer dtype of each element size: the restore blends bit patterns, not values (IEEE arithmetic
# would turn the inf·0 of a non-finite update into NaN, and must not round anything).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().view(_BITS[tensor.element_size()])


class StepSnapshot:
    def __init__(self) -> None:
        self._saved: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, its copy)

    @torch.no_grad()
    def save(self, tensors: List[torch.Tensor]) -> None:
        """Copy ``tensors`` (into the copies of the last step where the same tensors are listed again)."""
        saved = {}
        for tensor in tensors:
            previous = self._saved.get(id(tensor))
            copy = previous[1] if previous is not None and previous[0] is tensor else torch.empty_like(tensor)
            saved[id(tensor)] = (tensor, copy)
        self._saved = saved
        if saved:
            torch._foreach_copy_([_bits(c) for _, c in saved.values()], [_bits(t) for t, _ in saved.values()])

    @staticmethod
    def all_finite(tensors: List[torch.Tensor], device: torch.device) -> torch.Tensor:
        """1.0 on ``device`` when every floating-point tensor there is finite, else 0.0. Norms are
        taken in float64 so that large finite values do not overflow into a false alarm (tensors
        elsewhere, e.g. non-fused Adam's step counts on the host, are counters)."""
        floats = [t.detach() for t in tensors if t.is_floating_point() and t.device == device]
        if not floats:
            return torch.ones((), device=device)
        norms = torch._foreach_norm(floats, 2, dtype=torch.float64)
        return torch.stack(norms).isfinite().all().float()

    @torch.no_grad()
    def restore(self, tensors: List[torch.Tensor], bad: torch.Tensor) -> None:
        """Where ``bad`` (1.0) : every saved tensor back to its copy, every tensor created during the
        step (an optimiser's lazily made state) to zeros, which is how Adam's state starts. Where 0.0:
        nothing changes. ``tensors`` is the list after the step (``save``'s, plus anything new)."""
        groups: Dict[Tuple[torch.device, torch.dtype], Tuple[list, list, list]] = {}
        for tensor in tensors:
            bits = _bits(tensor)
            current, copies, created = groups.setdefault((bits.device, bits.dtype), ([], [], []))
            entry = self._saved.get(id(tensor))
            if entry is not None and entry[0] is tensor:
                current.append(bits)
                copies.append(_bits(entry[1]))
            else:
                created.append(bits)
        for (device, dtype), (current, copies, created) in groups.items():
            take = bad.to(device=device, dtype=dtype)  # host-side tensors (a sync) only on paths that sync anyway
            keep = 1 - take
            if current:
                torch._foreach_mul_(copies, take)  # the copies are spent: save() refills them next step
                torch._foreach_mul_(current, keep)
                torch._foreach_add_(current, copies)
            if created:
                torch._foreach_mul_(created, keep)
