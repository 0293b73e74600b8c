"""VA-VAE's vision-foundation alignment ("VF loss", Yao et al., CVPR 2025; hustvl/LightningDiT
``vavae/ldm/modules/losses/contperceptual.py``).

A frozen image backbone (DINOv2 ViT-L/14 by default) gives patch features f (B, D, g, g) of the
input resized to ``image_size``; a learned 1×1 convolution without bias projects the latents z
(B, C, h, w) to D channels, z'. With cosines taken over channels, per position i, j of one image:

    L_mcos  = mean_{b,i} relu(1 − m_cos − cos(z'_bi, f_bi))                  (marginal cosine)
    L_mdms  = mean_{b,i,j} relu(|cos(z'_bi, z'_bj) − cos(f_bi, f_bj)| − m_dist)  (marginal distance matrix)
    L_vf    = w_cos · L_mcos + w_dist · L_mdms
    λ_vf    = weight · clamp(‖∇_W L_nll‖ / (‖∇_W L_vf‖ + 1e-4), 0, max),  W = the encoder's last conv

(λ constant for the update, as the GAN's adaptive weight; ``adaptive_weight=false`` uses ``weight``
alone). Margins 0.5 / 0.25, weight 0.1 and max 1e8 are the published f16d32 settings. When the
backbone's patch grid differs from the latent grid (e.g. f8 latents), the features are resized
to the latent grid (bilinear). Unlike the reference, which feeds [-1, 1] images to DINOv2 as
they are, the images are normalised with the backbone's own mean/std (its image processor's,
ImageNet's if it has none). The projection is trained with the autoencoder and checkpointed,
never exported: the exported folder is the stock ``.vae`` alone.
"""

from __future__ import annotations

import logging
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VFLossConfig
from ..errors import VisionBackboneUnavailable

logger = logging.getLogger("latent_vae")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vf_loss(projected: torch.Tensor, features: torch.Tensor, cfg: VFLossConfig) -> Tuple[torch.Tensor, Dict]:
    """L_vf of projected latents and backbone features, both (B, D, h, w) (module doc), in fp32."""
    z, f = projected.float().flatten(2), features.float().flatten(2)  # (B, D, N)
    z_unit, f_unit = F.normalize(z, dim=1), F.normalize(f, dim=1)
    cosine = (z_unit * f_unit).sum(dim=1)  # (B, N)
    marginal_cosine = F.relu(1.0 - cfg.cos_margin - cosine).mean()
    distance_z = torch.einsum("bdi,bdj->bij", z_unit, z_unit)
    distance_f = torch.einsum("bdi,bdj->bij", f_unit, f_unit)
    marginal_distance = F.relu((distance_z - distance_f).abs() - cfg.distmat_margin).mean()
    loss = cfg.cos_weight * marginal_cosine + cfg.distmat_weight * marginal_distance
    return loss, {"vf_mcos": marginal_cosine.detach(), "vf_mdms": marginal_distance.detach()}


class VisionBackbone(nn.Module):
    """A frozen image backbone: images in [-1, 1] -> patch features (B, D, g, g)."""

    def __init__(self, model: nn.Module, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        config = model.config
        self.width = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
        self.patch_size = getattr(config, "patch_size", None)

    def train(self, mode: bool = True) -> "VisionBackbone":
        super().train(mode)
        self.model.eval()  # frozen: dropout and drop-path stay off
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        x = ((x + 1.0) / 2.0 - self.mean) / self.std
        hidden = self.model(pixel_values=x).last_hidden_state
        if hidden.dim() == 4:  # convolutional backbones: already (B, D, g, g)
            return hidden
        grid = self.image_size // self.patch_size
        patches = hidden[:, -grid * grid:]  # drop the class and register tokens
        return patches.transpose(1, 2).reshape(len(x), -1, grid, grid)


def load_vision_backbone(cfg: VFLossConfig) -> VisionBackbone:
    """The configured ``AutoModel`` with its real weights (hub id or local folder), or an error naming
    the fix; a random network is never used."""
    fix = (f"download it once (huggingface-cli download {cfg.backbone}) or set regularizer.vf.backbone to a local "
           "folder holding it; or train without the VF loss: regularizer.vf.weight=0")
    try:
        from transformers import AutoImageProcessor, AutoModel
    except ImportError:
        raise VisionBackboneUnavailable("the VF loss needs the transformers package: pip install transformers; "
                                        "or train without it: regularizer.vf.weight=0") from None
    try:
        model = AutoModel.from_pretrained(cfg.backbone)
    except (OSError, ValueError) as err:
        raise VisionBackboneUnavailable(f"VF loss backbone {cfg.backbone!r} could not be loaded "
                                        f"({str(err).splitlines()[0]}): {fix}") from None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        processor = AutoImageProcessor.from_pretrained(cfg.backbone)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        logger.info("VF loss: %s has no image processor; normalising with ImageNet's mean/std", cfg.backbone)
    logger.info("VF loss: backbone %s (%s), features of %d px images", cfg.backbone, type(model).__name__,
                cfg.image_size)
    return VisionBackbone(model, cfg.image_size, mean, std)


class VFAlignment(nn.Module):
    """The learned projection (trained, checkpointed, not exported) and the frozen backbone (neither
    trained nor checkpointed: it is held outside the module tree)."""

    def __init__(self, cfg: VFLossConfig, latent_channels: int, backbone: VisionBackbone):
        super().__init__()
        self.cfg = cfg
        self.projection = nn.Conv2d(latent_channels, backbone.width, kernel_size=1, bias=False)
        self._backbone = (backbone,)  # a tuple: not a submodule, so not in state_dict() nor in the optimiser

    @property
    def backbone(self) -> VisionBackbone:
        return self._backbone[0]

    def _apply(self, fn, *args, **kwargs):
        self.backbone._apply(fn, *args, **kwargs)  # follows .to(device) with the projection
        return super()._apply(fn, *args, **kwargs)

    def forward(self, images: torch.Tensor, latents: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        features = self.backbone(images)
        if features.shape[-2:] != latents.shape[-2:]:
            features = F.interpolate(features, size=latents.shape[-2:], mode="bilinear", align_corners=False)
        return vf_loss(self.projection(latents.float()), features, self.cfg)
