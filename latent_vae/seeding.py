"""Seeds: one derivation for every random stream, and per-sample noise that does not depend on batching."""

from __future__ import annotations

from typing import List

import numpy as np
import torch


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed that is a pure function of the given non-negative integers."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> np.uint64(1))


# Training noise is salted so that it never repeats a stream drawn elsewhere from the same seed.
TRAINING_NOISE_SALT = 0x5EED_0F_A0_15E


def seeded_normal(seeds: List[int], shape, device, dtype, salt: int = TRAINING_NOISE_SALT) -> torch.Tensor:
    """Standard normal noise, one tensor per sample drawn from that sample's own seed (``seed ^ salt``).

    The noise of a sample depends only on its seed, not on the batch it lands in or the
    process computing it — what makes multi-process and resumed runs reproduce exactly.
    Drawn on ``device`` itself: no host-to-device copy (which would synchronise a training step).
    With ``salt=0`` on the CPU it is what ``torch.Generator().manual_seed(seed)`` gives: the
    generator a user passes to stock diffusers to reproduce a stored posterior sample.
    """
    device = torch.device(device)
    return torch.stack([
        torch.randn(shape, device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(seed ^ salt))
        for seed in seeds
    ])
