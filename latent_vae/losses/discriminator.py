"""PatchGAN discriminator, GAN losses and the LeCam regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        # Per-sample statistics: identical under DDP, with batch size 1, and for real/fake
        # batches concatenated into one forward pass.
        return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, affine=True)
    if kind == "sync_batch":
        # Converted to SyncBatchNorm by the trainer when more than one process runs.
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """pix2pix/taming PatchGAN: ``num_layers`` strided 4x4 convolutions, a logit per patch.

    With ``num_layers=3`` and 64 base channels this is the latent-diffusion discriminator
    (receptive field 70x70), except that the norm defaults to GroupNorm rather than the
    unsynchronised BatchNorm that misbehaves under DDP and at batch size 1.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "group"):
        super().__init__()
        use_bias = norm == "none"
        layers = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=use_bias), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    """N(0, 0.02) convolutions, N(1, 0.02) norm scales (the pix2pix/taming initialisation)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """hinge: ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]); vanilla: ½(E[softplus(−D(x))] + E[softplus(D(x̂))])."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """hinge: −E[D(x̂)]; vanilla (non-saturating): E[softplus(−D(x̂))] = −E[log σ(D(x̂))]."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def lecam_regularizer(logits_real, logits_fake, ema_real, ema_fake) -> torch.Tensor:
    """LeCam (Tseng et al. 2021): E[relu(D(x) − α_fake)²] + E[relu(α_real − D(x̂))²].

    α_real, α_fake are exponential moving averages of the discriminator's mean outputs.
    """
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
