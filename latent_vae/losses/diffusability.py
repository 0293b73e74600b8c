"""The diffusability regularisers together: scale equivariance, EQ-VAE and the VF loss
(``equivariance.py``, ``vf.py``), KL and VQ alike, added to the generator objective.

``build_diffusability`` returns None when every weight is 0, so a plain run has no extra module,
no extra parameter and the same checkpoint keys. Otherwise the module is held by the latent
regulariser (``regularizer.diffusability``), so its trained part (the VF projection) is optimised
and checkpointed with the autoencoder and never exported. ``train.step`` calls it once per G step
with the latents the decoder received.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..config import Config
from ..distributed import all_reduce_mean_
from ..models.stock import Autoencoder, encoder_output_weight, is_vq, latent_channels
from .base import reduce_elements
from .equivariance import EQVAERegularizer, reduced_reconstruction, scale_equivariance_loss
from .vf import VFAlignment, VisionBackbone, load_vision_backbone

logger = logging.getLogger("latent_vae")


def adaptive_weight(loss: torch.Tensor, term: torch.Tensor, layer: torch.Tensor, max_weight: float) -> torch.Tensor:
    """‖∇_W loss‖ / (‖∇_W term‖ + 1e-4), clamped to [0, max], detached; under DDP from the
    process-averaged gradients, so every rank uses the same weight."""
    grads = [torch.autograd.grad(value, layer, retain_graph=True)[0].float() for value in (loss, term)]
    grads = all_reduce_mean_(torch.stack(grads))
    return torch.clamp(grads[0].norm() / (grads[1].norm() + 1e-4), 0.0, max_weight).detach()


def decoder_of(vae: Autoencoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents as the regulariser returned them -> images (VQ latents are quantised already)."""
    if is_vq(vae):
        return lambda latents: vae.decode(latents, force_not_quantize=True).sample
    return lambda latents: vae.decode(latents).sample


class DiffusabilityRegularizer(nn.Module):
    def __init__(self, cfg: Config, vae: Autoencoder, backbone: Optional[VisionBackbone] = None):
        super().__init__()
        regularizer = cfg.regularizer
        self.scale_cfg = regularizer.scale_equivariance
        self.eq_vae = EQVAERegularizer(regularizer.eq_vae, cfg.train.seed) if regularizer.eq_vae.weight > 0 else None
        self.reduction = cfg.reconstruction.reduction
        self.vf = None
        if regularizer.vf.weight > 0:
            backbone = backbone if backbone is not None else load_vision_backbone(regularizer.vf)
            self.vf = VFAlignment(regularizer.vf, latent_channels(vae), backbone)

    def forward(self, vae: Autoencoder, images: torch.Tensor, latents: torch.Tensor, reconstructions: torch.Tensor,
                logvar: torch.Tensor, reconstruction_terms: Callable, step: int
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The weighted sum of the enabled terms and their logged values.

        ``reconstruction_terms`` is ``AutoencoderLoss.reconstruction_terms`` (pixel + LPIPS per pixel).
        """
        decode, rec_loss = decoder_of(vae), reduced_reconstruction(reconstruction_terms, self.reduction)
        total = images.new_zeros((), dtype=torch.float32)
        logs: Dict[str, torch.Tensor] = {}
        if self.scale_cfg.weight > 0:
            loss, values = scale_equivariance_loss(images, latents, decode, rec_loss, self.scale_cfg)
            total, logs = total + loss, {**logs, **values}
        if self.eq_vae is not None:
            loss, values = self.eq_vae(images, latents, decode, rec_loss, step)
            total, logs = total + loss, {**logs, **values}
        if self.vf is not None:
            loss, values = self.vf(images, latents)
            weight = torch.full((), self.vf.cfg.weight, device=loss.device)
            encoder_weight = encoder_output_weight(vae)
            if self.vf.cfg.adaptive_weight and encoder_weight.requires_grad:
                rec = reconstruction_terms(images, reconstructions)[0]
                nll = reduce_elements(rec / torch.exp(logvar.float()) + logvar.float(), self.reduction)
                weight = weight * adaptive_weight(nll, loss, encoder_weight, self.vf.cfg.adaptive_weight_max)
            total = total + weight * loss
            logs.update(values, vf_loss=loss.detach(), vf_weight=weight)
        return total, logs


def build_diffusability(vae: Autoencoder, cfg: Config,
                        backbone: Optional[VisionBackbone] = None) -> Optional[DiffusabilityRegularizer]:
    """The regularisers ``cfg.regularizer`` enables, or None. ``backbone`` replaces loading the VF
    backbone by name (tests build a tiny one in code)."""
    regularizer = cfg.regularizer
    if max(regularizer.scale_equivariance.weight, regularizer.eq_vae.weight, regularizer.vf.weight) <= 0:
        return None
    if cfg.model.trainable == "decoder":
        logger.warning("scale equivariance / EQ-VAE with model.trainable=decoder: only the decoder learns to decode "
                       "transformed latents; the latent space (its spectrum, what a diffusion model sees) cannot "
                       "change. Train the encoder too (model.trainable=all) to make the latents more diffusable.")
    return DiffusabilityRegularizer(cfg, vae, backbone)
