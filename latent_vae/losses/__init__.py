"""The training objective: reconstruction + perceptual, discriminator, and latent regularisers."""

from .autoencoder_loss import AutoencoderLoss, adaptive_gan_weight
from .discriminator import PatchDiscriminator, discriminator_loss, generator_loss, lecam_regularizer
from .perceptual import PerceptualLoss, PerceptualWeightsUnavailable, build_lpips
from .regularizers import KLRegularizer, RegularizerOutput, kl_weight_at, reduce_elements

__all__ = [
    "AutoencoderLoss",
    "KLRegularizer",
    "PatchDiscriminator",
    "PerceptualLoss",
    "PerceptualWeightsUnavailable",
    "RegularizerOutput",
    "adaptive_gan_weight",
    "build_lpips",
    "discriminator_loss",
    "generator_loss",
    "kl_weight_at",
    "lecam_regularizer",
    "reduce_elements",
]
