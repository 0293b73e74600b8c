"""The module the trainer optimises: a stock diffusers autoencoder (AutoencoderKL, VQModel or AutoencoderTiny)
plus its regulariser.

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

from ..config import ModelConfig
from ..errors import ConfigError
from ..losses.base import RegularizerOutput
from ..models.loading import build_autoencoder
from ..models.stock import Autoencoder, decoder_output_weight, encoder_latents, is_tiny, is_vq, posterior
from ..seeding import seeded_normal


def build_trainable_vae(cfg: ModelConfig) -> Autoencoder:
    """The stock model to train, with ``model.trainable`` and ``model.gradient_checkpointing`` applied."""
    vae = build_autoencoder(cfg)
    if cfg.trainable == "decoder":
        # Decoder-only fine-tuning: the latent space (encoder + quant_conv, codebook) is frozen,
        # so diffusion models trained on this VAE's latents stay valid.
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        if not is_tiny(vae):  # AutoencoderTiny has no post-quantisation convolution
            vae.post_quant_conv.requires_grad_(True)
    if cfg.gradient_checkpointing and is_tiny(vae):
        # diffusers' EncoderTiny skips its [-1, 1] -> [0, 1] input scaling on the checkpointed path: the
        # model would train on other inputs than it is used with.
        raise ConfigError("model.gradient_checkpointing is not supported for AutoencoderTiny (diffusers' "
                          "checkpointed encoder skips its input scaling); set model.gradient_checkpointing=false")
    if cfg.gradient_checkpointing:
        # diffusers flags VQModel as unsupported, but its Encoder/Decoder are AutoencoderKL's,
        # which checkpoint correctly (tested); the flag is per instance and is not exported.
        vae._supports_gradient_checkpointing = True
        vae.enable_gradient_checkpointing()
    return vae


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
        return decoder_output_weight(self.vae)

    def forward(self, images: torch.Tensor, seeds: Optional[List[int]] = None, step: int = 0) -> AutoencoderOutput:
        if is_tiny(self.vae):  # deterministic latents, decoded as they are
            regularized = self.regularizer(self.vae.encode(images).latents, step)
            decoded = self.vae.decode(regularized.latents).sample
        elif is_vq(self.vae):
            # The regulariser quantises (and maintains the codebook); decode must not quantise again.
            regularized = self.regularizer(encoder_latents(self.vae, images), step)
            decoded = self.vae.decode(regularized.latents, force_not_quantize=True).sample
        else:
            q = posterior(self.vae, images)
            noise = None
            if seeds is not None:  # per-sample seeded noise: a sample's latent does not depend on its batch
                noise = seeded_normal(seeds, q.mean.shape[1:], q.mean.device, q.mean.dtype)
            regularized = self.regularizer(q, noise, step)
            decoded = self.vae.decode(regularized.latents).sample
        return AutoencoderOutput(decoded, regularized, self.logvar)
