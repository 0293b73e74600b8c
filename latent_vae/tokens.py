"""Token ids of a VQ model, computed exactly as stock ``diffusers.VQModel`` does.

For autoregressive or masked token models: ``encode_to_indices`` gives the code index of each
latent position (through the model's own ``quantize`` module: the indices stock diffusers
computes), ``decode_from_indices`` decodes the codebook rows of those indices. The latter equals
``VQModel.decode(VQModel.encode(x).latents)`` up to float rounding: diffusers feeds the decoder
``z + (e − z)`` (its straight-through expression) where we feed the codebook row ``e`` itself.
"""

from __future__ import annotations

import torch
from diffusers import VQModel


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
