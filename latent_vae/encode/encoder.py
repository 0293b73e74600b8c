"""Images -> latents exactly as stock diffusers computes them, through the fast paths."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..models.stock import Autoencoder, encoder_output, is_tiny, is_vq, latents_to_indices, to_diffusion_latents
from ..runtime import _CompiledOrEager, run_with_fp32_fallback
from ..seeding import seeded_normal
from .preprocess import to_model_input


class LatentEncoder:
    """Images -> latents exactly as stock diffusers computes them, through the fast paths.

    Returns fp32 CPU tensors: ``latent`` (posterior mean, or a posterior sample for
    ``latent="sample"``; for VQ the pre-quantisation latent ``VQModel.encode(x).latents``; for an
    AutoencoderTiny its deterministic ``encode(x).latents``),
    ``logvar`` (``mean_logvar``), ``tokens`` (VQ: ``latents_to_indices`` of the same latents), and
    with ``diffusion_input`` ``model_input``: ``latent`` as a diffusion pipeline built on the model
    sees it (``models.stock.to_diffusion_latents``: shift, then scaling factor, from the config).

    Under fp16 autocast a batch whose output is not finite is recomputed in fp32 (counted in
    ``fp32_retries``): some VAEs overflow fp16 (the reason sdxl-vae-fp16-fix exists).
    """

    def __init__(self, model: Autoencoder, latent: str = "mean", precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False, compile_backend: str = "inductor",
                 diffusion_input: bool = False):
        self.model, self.latent, self.precision = model.eval().requires_grad_(False), latent, precision
        self.diffusion_input = diffusion_input
        self.vq, self.tiny, self.channels_last, self.fp32_retries = is_vq(model), is_tiny(model), channels_last, 0
        self.device = next(model.parameters()).device
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self._forward = _CompiledOrEager(self._moments, compile_backend) if compile else self._moments

    @property
    def compile_failure(self) -> Optional[str]:
        """Why ``compile=True`` fell back to the eager model, or None."""
        return getattr(self._forward, "failure", None)

    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior parameters (KL, mean and log-variance stacked as diffusers does) or latents (VQ, tiny)."""
        return encoder_output(self.model, images)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, seeds: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """``pixels``: uint8 (B, 3, H, W) on the model's device; ``seeds``: one per image for ``sample``."""
        images = to_model_input(pixels)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        moments, retried = run_with_fp32_fallback(self._forward, images, self.precision, retry=self._moments)
        self.fp32_retries += int(retried)
        if self.vq:
            out = {"latent": moments, "tokens": latents_to_indices(self.model, moments)}
            return self._with_diffusion_input(out)
        if self.tiny:
            return self._with_diffusion_input({"latent": moments})
        posterior = DiagonalGaussianDistribution(moments)
        out = {"latent": posterior.mean}
        if self.latent == "mean_logvar":
            out["logvar"] = posterior.logvar
        elif self.latent == "sample":
            # Noise drawn on the CPU from a generator seeded with each image's own seed: the sample
            # depends only on that seed, not on the batch it fell in; stock diffusers gives the same
            # with `torch.Generator().manual_seed(seed)` and batch 1.
            noise = seeded_normal(seeds, posterior.mean.shape[1:], device="cpu", dtype=torch.float32, salt=0)
            out["latent"] = posterior.mean + posterior.std * noise.to(self.device)
        return self._with_diffusion_input(out)

    def _with_diffusion_input(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.diffusion_input:
            out["model_input"] = to_diffusion_latents(self.model, out["latent"])
        return {name: value.cpu() for name, value in out.items()}
