"""The training objective: reconstruction + perceptual, discriminator, and latent regularisers."""

from torch import nn

from ..config import Config, check_regularizer_kind
from ..errors import PerceptualWeightsUnavailable
from ..models.stock import Autoencoder
from ..presets import class_kind
from .autoencoder_loss import AutoencoderLoss, adaptive_gan_weight
from .base import NoRegularizer, RegularizerOutput, reduce_elements
from .diffusability import DiffusabilityRegularizer, build_diffusability
from .discriminator import PatchDiscriminator, discriminator_loss, generator_loss, lecam_regularizer
from .kl import KLRegularizer, kl_weight_at
from .perceptual import PerceptualLoss, build_lpips
from .vq import VectorQuantizerTrainer

__all__ = [
    "AutoencoderLoss",
    "KLRegularizer",
    "NoRegularizer",
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
    "VectorQuantizerTrainer",
    "build_regularizer",
    "DiffusabilityRegularizer",
    "build_diffusability",
]


def build_regularizer(vae: Autoencoder, config: Config) -> nn.Module:
    """The latent regulariser of ``regularizer.kind``, which must be the model's own (KL, VQ, none for an
    AutoencoderTiny), holding the enabled diffusability regularisers as ``.diffusability`` (trained and
    checkpointed with it)."""
    kind = class_kind(type(vae))
    check_regularizer_kind(config.regularizer.kind, kind, f"model {config.model.pretrained or config.model.preset}")
    reduction = config.reconstruction.reduction
    if kind == "vq":
        regularizer = VectorQuantizerTrainer(vae.quantize.embedding, config.regularizer.vq, reduction,
                                             config.train.seed, frozen=config.model.trainable == "decoder")
    elif kind == "kl":
        regularizer = KLRegularizer(config.regularizer.kl, reduction)
    else:
        regularizer = NoRegularizer()
    diffusability = build_diffusability(vae, config)
    if diffusability is not None:  # a submodule only when enabled: plain runs keep their checkpoint keys
        regularizer.diffusability = diffusability
    return regularizer
