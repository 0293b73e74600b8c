"""What a stock diffusers autoencoder computes, each under one name used everywhere.

Training, evaluation, comparison, export statistics, encoding and the latent tools all say it
with these functions, so "the latents" always means the same tensor:

- ``encoder_output``: the raw encoder output: KL posterior parameters (mean and log-variance
  stacked, as diffusers does), VQ pre-quantisation latents.
- ``posterior``: the KL posterior q(z|x) (``DiagonalGaussianDistribution``).
- ``encoder_latents``: deterministic latents: KL posterior mean, VQ pre-quantisation latents.
- ``quantized_latents``: VQ codebook rows as ``VQModel.quantize`` returns them.
- ``decoder_latents``: what ``decode`` is given for a reconstruction: KL posterior mean, VQ
  quantised latents.
- ``training_latents``: what a diffusion model trains on: a KL posterior sample, VQ pre-quantisation
  latents (what ``VQModel.encode`` returns and ``LDMPipeline`` denoises).
- token ids (``latents_to_indices`` ...) and the pipeline scaling (``to_diffusion_latents``).
- ``reconstruct``: decode(encode(x)) exactly as stock diffusers computes it.

An ``AutoencoderTiny`` (TAESD's design) has a deterministic encoder: its encoder output, encoder,
decoder and training latents are all that one tensor. A distilled student's latents already *are* a
teacher pipeline's scaled latents (its own ``scaling_factor`` is 1, ``shift_factor`` 0); one trained
from scratch (``regularizer.kind=none``) gets its ``scaling_factor`` from data, as a KL model does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, VQModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

Autoencoder = Union[AutoencoderKL, VQModel, AutoencoderTiny]


def is_vq(model: Autoencoder) -> bool:
    return isinstance(model, VQModel)


def is_tiny(model: Autoencoder) -> bool:
    """An ``AutoencoderTiny``: deterministic latents, no posterior, no codebook."""
    return isinstance(model, AutoencoderTiny)


def downsample_factor(model: Autoencoder) -> int:
    """The encoder's downsampling (an AutoencoderTiny's decoder upsamples as much: ``checks.check_tiny_levels``)."""
    widths = model.config.encoder_block_out_channels if is_tiny(model) else model.config.block_out_channels
    return 2 ** (len(widths) - 1)


def latent_channels(model: Autoencoder) -> int:
    if is_vq(model):
        return model.config.vq_embed_dim or model.config.latent_channels
    return model.config.latent_channels


def decoder_output_weight(model: Autoencoder) -> torch.Tensor:
    """The decoder's last convolution's weight: where the adaptive GAN weight is measured."""
    return model.decoder.layers[-1].weight if is_tiny(model) else model.decoder.conv_out.weight


def encoder_output_weight(model: Autoencoder) -> torch.Tensor:
    """The encoder's last convolution's weight: where the adaptive VF-loss weight is measured."""
    return model.encoder.layers[-1].weight if is_tiny(model) else model.encoder.conv_out.weight


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def encoder_output(model: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """KL: posterior parameters (mean and log-variance stacked on channels); VQ: pre-quantisation latents."""
    encoded = model.encode(images)
    return encoded.latents if is_vq(model) or is_tiny(model) else encoded.latent_dist.parameters


def posterior(model: AutoencoderKL, images: torch.Tensor) -> DiagonalGaussianDistribution:
    return model.encode(images).latent_dist


def encoder_latents(model: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Deterministic latents: the posterior mean (KL), the pre-quantisation latent (VQ), the output (tiny)."""
    encoded = model.encode(images)
    return encoded.latents if is_vq(model) or is_tiny(model) else encoded.latent_dist.mode()


def quantized_latents(model: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """Pre-quantisation latents -> the codebook rows ``VQModel.quantize`` gives (its straight-through form)."""
    return model.quantize(latents)[0]


def decoder_latents(model: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """KL posterior mean; VQ quantised latents. Decoding them gives the stock reconstruction."""
    latents = encoder_latents(model, images)
    return quantized_latents(model, latents) if is_vq(model) else latents


def training_latents(model: Autoencoder, images: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The latents a diffusion model is trained on, which ``scaling_factor`` normalises: a posterior
    sample (KL); the pre-quantisation latents (VQ), as latent-diffusion's VQ models and diffusers'
    ``LDMPipeline`` use them (the pipeline's ``vqvae.decode`` quantises the denoised latents)."""
    if is_vq(model) or is_tiny(model):
        return model.encode(images).latents
    return posterior(model, images).sample(generator=generator)


def reconstruct(model: Autoencoder, images: torch.Tensor, sample: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Inference reconstruction as stock diffusers computes it.

    KL: decode the posterior mean (``sample=True``: a posterior sample). VQ: nearest-code
    lookup in ``quantize.embedding`` inside ``VQModel.decode``.
    """
    if is_vq(model) or is_tiny(model):
        return model.decode(model.encode(images).latents).sample
    posterior = model.encode(images).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mode()
    return model.decode(latents).sample


def _latent_normalisation(model: Autoencoder, like: torch.Tensor):
    """(offset, scale) with diffusion latents = (z − offset) · scale, as diffusers pipelines apply them."""
    config = model.config
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, config.scaling_factor / std
    return config.get("shift_factor") or 0.0, config.scaling_factor


def to_diffusion_latents(model: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """What the denoiser of a pipeline built on ``model`` sees for encoder latents ``latents``."""
    offset, scale = _latent_normalisation(model, latents)
    return (latents - offset) * scale


def from_diffusion_latents(model: Autoencoder, scaled: torch.Tensor) -> torch.Tensor:
    """The inverse: what the pipeline hands ``model.decode`` for denoiser output ``scaled``."""
    offset, scale = _latent_normalisation(model, scaled)
    return scaled / scale + offset


@torch.no_grad()
def latents_to_indices(model: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """Pre-quantisation latents (``VQModel.encode(x).latents``, B, D, h, w) -> code indices (B, h, w)."""
    batch, _, height, width = latents.shape
    return model.quantize(latents)[2][2].reshape(batch, height, width)


@torch.no_grad()
def encode_to_indices(model: VQModel, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> code indices, LongTensor (B, H/f, W/f)."""
    return latents_to_indices(model, model.encode(images).latents)


@torch.no_grad()
def indices_to_latents(model: VQModel, indices: torch.Tensor) -> torch.Tensor:
    """Code indices (B, h, w) -> quantised latents (B, D, h, w): codebook rows, channels first."""
    return model.quantize.embedding(indices).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def decode_from_indices(model: VQModel, indices: torch.Tensor) -> torch.Tensor:
    """Code indices (B, h, w) -> images in [-1, 1]."""
    return model.decode(indices_to_latents(model, indices), force_not_quantize=True).sample
