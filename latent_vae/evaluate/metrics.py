"""Reconstruction metrics with stated conventions (GUIDE §2).

PSNR: per image, on images in [0, 1] (reconstructions clamped), 10·log10(1 / MSE), then averaged.
SSIM: per image, 11×11 Gaussian window (σ = 1.5), data_range = 1 for [0, 1] images, averaged
over channels — torchmetrics' implementation (K1 = 0.01, K2 = 0.03).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1], clamped, fp32."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr_per_image(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image of a batch in [-1, 1]; identical images give +inf."""
    x, y = to_unit_range(reconstructions), to_unit_range(targets)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def ssim_per_image(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SSIM of each image of a batch in [-1, 1]."""
    return structural_similarity_index_measure(
        to_unit_range(reconstructions), to_unit_range(targets), data_range=1.0,
        kernel_size=11, sigma=1.5, gaussian_kernel=True, reduction="none",
    )
