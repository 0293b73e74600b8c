"""The teacher, the student, and what the student is trained to compute.

The teacher is a frozen ``AutoencoderKL``. What a diffusers pipeline built on it denoises are its
*scaled* latents, ``(z − shift_factor) · scaling_factor`` (or per channel with ``latents_mean`` /
``latents_std``): ``models.stock.to_diffusion_latents``. A stock ``AutoencoderTiny`` keeps
``scaling_factor`` 1 and ``shift_factor`` 0, so the pipeline hands its decoder exactly those scaled
latents and takes its encoder's output as them; the student therefore learns

- encoder: image → the teacher's scaled latents (MSE, TAESD's encoder objective), and
- decoder: the teacher's scaled latents → the image (the project's autoencoder loss against the
  original image: pixel + LPIPS + PatchGAN, adaptive or fixed weight; optionally also matching the
  teacher's own decode of the same latents).

``DistillStudent`` is the module DDP wraps; its forward pass returns a ``train.trainable.AutoencoderOutput``
so that ``train.step.train_step`` runs it unchanged: the reconstructions go through
``AutoencoderLoss`` and the distillation terms arrive as the "regulariser" loss, added to L_G.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn

from ..config import DistillConfig, ReconstructionConfig
from ..errors import ConfigError
from ..losses.base import RegularizerOutput, reduce_elements
from ..models.checks import check_tiny_levels
from ..models.loading import load_autoencoder
from ..models.stock import (
    count_parameters,
    decoder_output_weight,
    downsample_factor,
    from_diffusion_latents,
    is_tiny,
    is_vq,
    latent_channels,
    posterior,
    to_diffusion_latents,
)
from ..presets import check_student_preset
from ..seeding import seeded_normal
from ..train.trainable import AutoencoderOutput

# The student's own scaling is the identity: its latents already are the teacher pipeline's scaled latents.
FIXED_STUDENT_KEYS = ("scaling_factor", "shift_factor")


class Teacher:
    """A frozen ``AutoencoderKL`` and its pipelines' latent convention (not an ``nn.Module``: never
    saved in checkpoints, never wrapped in DDP, never averaged)."""

    def __init__(self, vae: AutoencoderKL, latents: str = "sample"):
        self.vae = vae.eval().requires_grad_(False)
        self.latents = latents

    def to(self, device: torch.device) -> "Teacher":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def scaled_latents(self, images: torch.Tensor, seeds: Optional[List[int]] = None) -> torch.Tensor:
        """The latents the teacher's pipeline denoises for ``images``: a posterior sample with each
        image's noise drawn from its own seed (``distill.teacher_latents=sample``, what a diffusion
        model is trained on and generates), or the posterior mean (``mode``, or when no seeds are given)."""
        q = posterior(self.vae, images)
        latents = q.mode()
        if seeds is not None and self.latents == "sample":
            latents = q.mean + q.std * seeded_normal(seeds, latents.shape[1:], latents.device, latents.dtype)
        return to_diffusion_latents(self.vae, latents)

    @torch.no_grad()
    def decode_scaled(self, scaled: torch.Tensor) -> torch.Tensor:
        """The teacher's image for scaled latents, as its pipeline decodes them."""
        return self.vae.decode(from_diffusion_latents(self.vae, scaled)).sample

    def convention(self) -> str:
        """The scaling the student's latents follow, in words and a formula."""
        config = self.vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            return (f"(z − latents_mean) · {config.scaling_factor:g} / latents_std, per channel "
                    f"(latents_mean {list(config.latents_mean)}, latents_std {list(config.latents_std)})")
        shift = config.get("shift_factor") or 0.0
        return f"(z − {shift:g}) · {config.scaling_factor:g}" if shift else f"z · {config.scaling_factor:g}"


def load_teacher(name_or_path: Optional[str], subfolder: Optional[str], latents: str = "sample") -> Teacher:
    """The teacher named by ``distill.teacher`` (``--teacher``): an AutoencoderKL folder or hub id."""
    if not name_or_path:
        raise ConfigError("no teacher: give --teacher <AutoencoderKL folder or hub id> (or distill.teacher=...), "
                          "e.g. --teacher stabilityai/sd-vae-ft-ema")
    try:
        vae = load_autoencoder(name_or_path, subfolder=subfolder)
    except (OSError, ValueError) as err:  # hub look-ups fail with OSError, malformed ids with ValueError
        if isinstance(err, (FileNotFoundError, PermissionError, ConfigError)):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"teacher {name_or_path!r}{f' (subfolder {subfolder})' if subfolder else ''} cannot be "
                          f"loaded ({first}); give a local diffusers folder, or a hub id that is cached or "
                          "reachable (a pipeline repository needs --teacher-subfolder vae)") from None
    if is_vq(vae) or is_tiny(vae):
        raise ConfigError(f"teacher {name_or_path!r} is a {type(vae).__name__}; distillation needs an "
                          "AutoencoderKL teacher (the VAE of an SD/SDXL/SD3/FLUX-style pipeline)")
    return Teacher(vae, latents)


def build_student(cfg: DistillConfig, teacher: Teacher) -> AutoencoderTiny:
    """A stock ``AutoencoderTiny`` of preset ``distill.student`` with ``distill.student_config`` on top,
    its latent channels the teacher's; refused in one line when it cannot serve the teacher's pipelines."""
    preset = check_student_preset(cfg.student)
    fixed = sorted(set(cfg.student_config) & set(FIXED_STUDENT_KEYS))
    if fixed:
        raise ConfigError(f"distill.student_config.{fixed[0]} cannot be set: the student's latents are the teacher "
                          "pipeline's scaled latents, so its own scaling stays the identity (scaling_factor 1, "
                          "shift_factor 0); remove it")
    kwargs: Dict[str, Any] = {**preset.kwargs, "latent_channels": latent_channels(teacher.vae), **cfg.student_config}
    if kwargs["latent_channels"] != latent_channels(teacher.vae):
        raise ConfigError(f"distill.student_config.latent_channels={kwargs['latent_channels']} differs from the "
                          f"teacher's {latent_channels(teacher.vae)} latent channels; remove it")
    try:
        student = AutoencoderTiny(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"distill.student_config does not fit AutoencoderTiny: {err}") from None
    factor = check_tiny_levels(student.config, "distill.student_config")
    if factor != downsample_factor(teacher.vae):
        raise ConfigError(f"the student downsamples by {factor}, the teacher by {downsample_factor(teacher.vae)}: "
                          f"give the student {len(teacher.vae.config.block_out_channels)} levels "
                          "(distill.student_config)")
    return student


def trained_parts(parts: str) -> List[str]:
    """``distill.parts`` as the list of trained halves."""
    return ["encoder", "decoder"] if parts == "both" else [parts]


class DistillStudent(nn.Module):
    """The student (``.vae``, what is exported and averaged) with the frozen teacher beside it.

    The halves not in ``distill.parts`` are frozen. ``logvar`` is the NLL log-variance of the loss
    module, fixed at 0 (the student's reconstruction term is the plain weighted sum)."""

    def __init__(self, vae: AutoencoderTiny, teacher: Teacher, cfg: DistillConfig,
                 reconstruction: ReconstructionConfig):
        super().__init__()
        self.vae, self.teacher = vae, teacher
        self.parts = trained_parts(cfg.parts)
        self.encoder_weight, self.teacher_decode_weight = cfg.encoder_weight, cfg.teacher_decode_weight
        self.reduction, self.pixel_loss = reconstruction.reduction, reconstruction.pixel_loss
        self.logvar = nn.Parameter(torch.zeros(()), requires_grad=False)
        vae.requires_grad_(False)
        for part in self.parts:
            getattr(vae, part).requires_grad_(True)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution: where the adaptive GAN weight is measured."""
        return decoder_output_weight(self.vae)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.vae.parameters() if p.requires_grad)

    def forward(self, images: torch.Tensor, seeds: Optional[List[int]] = None, step: int = 0) -> AutoencoderOutput:
        target = self.teacher.scaled_latents(images, seeds)
        loss = torch.zeros((), device=images.device)
        logs: Dict[str, torch.Tensor] = {}
        if "encoder" in self.parts:
            latents = self.vae.encode(images).latents
            error = reduce_elements((latents.float() - target.float()).pow(2), self.reduction)
            loss = loss + self.encoder_weight * error
            logs["encoder_mse"] = F.mse_loss(latents.detach().float(), target.float())
        if "decoder" in self.parts:
            reconstructions = self.vae.decode(target).sample
            if self.teacher_decode_weight > 0:
                difference = reconstructions.float() - self.teacher.decode_scaled(target).float()
                error = difference.abs() if self.pixel_loss == "l1" else difference.pow(2)
                match = reduce_elements(error, self.reduction)
                loss = loss + self.teacher_decode_weight * match
                logs["teacher_decode"] = match.detach()
        else:  # encoder only: the frozen decoder shows what the student's latents decode to (logged, not trained)
            with torch.no_grad():
                reconstructions = self.vae.decode(latents).sample
        logs["distill"] = loss.detach()
        return AutoencoderOutput(reconstructions, RegularizerOutput(target, loss, logs), self.logvar)


def describe(student: AutoencoderTiny) -> str:
    config = student.config
    return (f"AutoencoderTiny, encoder {count_parameters(student.encoder):,} / decoder "
            f"{count_parameters(student.decoder):,} parameters, width {config.decoder_block_out_channels[0]}, "
            f"{config.latent_channels} latent channels")
