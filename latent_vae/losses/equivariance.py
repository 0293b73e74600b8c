"""Spatial transforms applied alike to an image and to its latent, and the two decoder regularisers
built on them (KL and VQ alike: they act on the latents the decoder receives).

A transform is named: ``scale_<s>`` (downscale by s, 0 < s < 1), ``rot90``/``rot180``/``rot270``
(counter-clockwise quarter turns in the (H, W) plane) or ``hflip``. ``transform_pair`` applies one
to images (B, 3, H, W) and latents (B, C, h, w), H = f·h: a scale gives the latent the grid
h' = round(s·h) and the image f·h', so the pair stays aligned exactly (bilinear with antialiasing,
i.e. a low-pass downscale).

- **Scale equivariance** (Skorokhodov et al., "Improving the Diffusability of Autoencoders", ICML
  2025): ``L_SE = w · mean_s L_rec(down_s(x), D(down_s(z)))`` over the configured factors. It asks
  the decoder to turn a low-passed latent into the low-passed image, which removes the latent's
  excess high-frequency content.
- **EQ-VAE** (Kouzelis et al., ICML 2025; zelaki/eqvae): with probability p per step, a transform
  τ drawn from the configured set; ``L_EQ = w · L_rec(τ(x), D(τ(z)))`` with the reconstruction
  loss (pixel + LPIPS). The reference code scales by s ∈ {8/32 … 31/32} and rotates by 90/180/270°
  together on p = 0.5 of the steps, and on those steps replaces the ordinary reconstruction target;
  here the term is added to the ordinary objective (``weight``), which keeps the untransformed
  reconstruction (the reference's "prior preservation") on every step.

``L_rec`` is ``AutoencoderLoss.reconstruction_terms`` reduced like the main objective
(``reconstruction.reduction``), so both terms are in the units of the reconstruction NLL.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..config import EQVAEConfig, ScaleEquivarianceConfig
from ..errors import ConfigError
from ..seeding import derive_seed
from .base import reduce_elements

_SCALE = re.compile(r"^scale_(0?\.\d+)$")
ROTATIONS = {"rot90": 1, "rot180": 2, "rot270": 3}


def check_transform(name: str) -> None:
    """A transform name this module knows (``scale_<s>`` with 0 < s < 1, rotations, ``hflip``)."""
    match = _SCALE.match(name)
    if match and 0.0 < float(match.group(1)) < 1.0:
        return
    if name in ROTATIONS or name == "hflip":
        return
    raise ConfigError(f"unknown spatial transform {name!r}; use scale_<s> (0 < s < 1, e.g. scale_0.5), "
                      "rot90, rot180, rot270 or hflip")


def downscale(tensor: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialiasing (a low-pass filter, unlike plain bilinear sampling), in fp32."""
    return F.interpolate(tensor.float(), size=size, mode="bilinear", antialias=True, align_corners=False
                         ).to(tensor.dtype)


def transform_pair(name: str, images: torch.Tensor, latents: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(τ(images), τ(latents)), spatially aligned (module doc)."""
    match = _SCALE.match(name)
    if match:
        scale = float(match.group(1))
        factor = images.shape[-1] // latents.shape[-1]
        size = tuple(max(1, round(scale * n)) for n in latents.shape[-2:])
        return downscale(images, (size[0] * factor, size[1] * factor)), downscale(latents, size)
    if name in ROTATIONS:
        return (torch.rot90(images, ROTATIONS[name], dims=(-2, -1)),
                torch.rot90(latents, ROTATIONS[name], dims=(-2, -1)))
    if name == "hflip":
        return images.flip(-1), latents.flip(-1)
    check_transform(name)
    raise AssertionError(name)  # check_transform raised


def transform_image(name: str, images: torch.Tensor, factor: int) -> torch.Tensor:
    """τ(images) alone, with the same output size as ``transform_pair`` for a latent of 1/``factor`` the size."""
    latent_shape = (*images.shape[:-2], images.shape[-2] // factor, images.shape[-1] // factor)
    return transform_pair(name, images, images.new_empty(latent_shape))[0]


ReconstructionLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def scale_equivariance_loss(images: torch.Tensor, latents: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
                            reconstruction_loss: ReconstructionLoss, cfg: ScaleEquivarianceConfig,
                            ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``weight · mean over factors of L_rec(down(x), D(down(z)))`` and its logged value."""
    terms = []
    for factor in cfg.factors:
        target, small = transform_pair(f"scale_{factor}", images, latents)
        terms.append(reconstruction_loss(target, decode(small)))
    loss = torch.stack(terms).mean()
    return cfg.weight * loss, {"scale_equivariance": loss.detach()}


class EQVAERegularizer:
    """EQ-VAE's transformed-latent reconstruction, drawn per step from a seeded stream (same on every
    process, reproducible on resume: the draw depends on the seed and the step only)."""

    def __init__(self, cfg: EQVAEConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def draw(self, step: int) -> Sequence[str]:
        """The transforms (composed in order) of step ``step``; empty on steps without the term."""
        rng = random.Random(derive_seed(self.seed, 15, step))
        if rng.random() >= self.cfg.probability:
            return ()
        names = [f"scale_{rng.choice(self.cfg.scales)}"] if self.cfg.scales else []
        return names + ([rng.choice(self.cfg.rotations)] if self.cfg.rotations else [])

    def __call__(self, images: torch.Tensor, latents: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
                 reconstruction_loss: ReconstructionLoss, step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        names = self.draw(step)
        if not names:
            return images.new_zeros((), dtype=torch.float32), {}
        target, moved = images, latents
        for name in names:
            target, moved = transform_pair(name, target, moved)
        loss = reconstruction_loss(target, decode(moved))
        return self.cfg.weight * loss, {"eq_vae": loss.detach()}


def reduced_reconstruction(terms: Callable, reduction: str) -> ReconstructionLoss:
    """``(target, decoded) -> reduce(rec)`` from ``AutoencoderLoss.reconstruction_terms``."""
    def loss(target: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        return reduce_elements(terms(target, decoded)[0], reduction)
    return loss
