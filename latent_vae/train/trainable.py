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

from ..losses.base import RegularizerOutput
from ..models.stock import Autoencoder, is_vq
from ..seeding import seeded_normal


@dataclass
class AutoencoderOutput:
    reconstructions: torch.Tensor
    regularizer: RegularizerOutput
    logvar: torch.Tensor


class TrainableAutoencoder(nn.Module):
    def __init__(self, vae: Autoencoder, regularizer: nn.Module, logvar_init: float = 0.0, learn_logvar: bool = False):
        super().__init__()
        self.vae = vae
        self.regularizer = regularizer
        # latent-diffusion's learnable log-variance s of the NLL; frozen at its initial value
        # (0 in the published recipe, so NLL = rec) unless reconstruction.learn_logvar is set.
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
