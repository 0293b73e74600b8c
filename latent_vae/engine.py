"""The module the trainer optimises: a stock diffusers autoencoder plus its regulariser.

``TrainableAutoencoder`` is what gets wrapped in DDP, so every training forward pass goes
through the prepared module. It holds everything the autoencoder optimiser updates: the
diffusers model, the regulariser's state (VQ codebook statistics) and the NLL log-variance.
Only ``.vae`` is exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .config import Config
from .losses.regularizers import KLRegularizer, RegularizerOutput
from .models import Autoencoder, is_vq

_NOISE_SALT = 0x5EED_0F_A0_15E


def seeded_normal(seeds: List[int], shape, device, dtype) -> torch.Tensor:
    """Standard normal noise, one tensor per sample drawn from that sample's own seed.

    The noise of a sample depends only on its seed, not on the batch it lands in or the
    process computing it — what makes multi-process and resumed runs reproduce exactly.
    Drawn on the device itself: no host-to-device copy (which would synchronise the step).
    """
    device = torch.device(device)
    return torch.stack([
        torch.randn(shape, device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(seed ^ _NOISE_SALT))
        for seed in seeds
    ])


@dataclass
class AutoencoderOutput:
    reconstructions: torch.Tensor
    regularizer: RegularizerOutput
    logvar: torch.Tensor


def build_regularizer(vae: Autoencoder, config: Config) -> nn.Module:
    if is_vq(vae):
        from .losses.quantizer import VectorQuantizerTrainer

        return VectorQuantizerTrainer(vae.quantize.embedding, config.loss, config.quantizer, config.train.seed)
    return KLRegularizer(config.loss)


class TrainableAutoencoder(nn.Module):
    def __init__(self, vae: Autoencoder, regularizer: nn.Module, logvar_init: float = 0.0, learn_logvar: bool = False):
        super().__init__()
        self.vae = vae
        self.regularizer = regularizer
        # latent-diffusion's learnable log-variance s of the NLL; frozen at its initial value
        # (0 in the published recipe, so NLL = rec) unless loss.learn_logvar is set.
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution: where the adaptive GAN weight is measured."""
        return self.vae.decoder.conv_out.weight

    def forward(self, images: torch.Tensor, seeds: Optional[List[int]] = None, step: int = 0) -> AutoencoderOutput:
        encoded = self.vae.encode(images)
        if is_vq(self.vae):
            regularized = self.regularizer(encoded.latents, step)
            decoded = self.vae.decode(regularized.latents, force_not_quantize=True).sample
        else:
            posterior = encoded.latent_dist
            noise = None
            if seeds is not None:
                noise = seeded_normal(seeds, posterior.mean.shape[1:], posterior.mean.device, posterior.mean.dtype)
            regularized = self.regularizer(posterior, noise, step)
            decoded = self.vae.decode(regularized.latents).sample
        return AutoencoderOutput(decoded, regularized, self.logvar)
