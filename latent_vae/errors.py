"""Every error a user can fix, in one place: the CLI reports these in one line, no traceback.

Ground floor: imports nothing from latent_vae. ``check_choice`` and ``check_positive`` are the one
way to validate an option, whether it comes from a config key (``train.batch_size``) or a
command-line flag (``--dtype``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def with_article(name: str) -> str:
    """``a VQModel``, ``an AutoencoderTiny``: a class name in a message."""
    return f"{'an' if name[:1].upper() in 'AEIOU' else 'a'} {name}"


class ConfigError(ValueError):
    """A bad configuration or option; the message names the offending key and how to fix it."""


class DataError(ValueError):
    """A dataset that cannot be used at all (empty, missing column, wrong path)."""


class ImageReadError(Exception):
    """One input image cannot be decoded; it is skipped and reported by path."""


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; says which and why."""


class UnreadableWeights(CheckpointError):
    """A weights file that is not safe or not readable (pickles are refused)."""


class InvalidModel(CheckpointError):
    """A model folder or file whose config or weights header is not sane or not consistent."""


class ConversionError(CheckpointError):
    """A single-file checkpoint that does not convert to a diffusers model."""


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what was saved."""


class PerceptualWeightsUnavailable(RuntimeError):
    """Pretrained weights of a perceptual or metric network are missing; the message names the fix."""


class InceptionWeightsUnavailable(PerceptualWeightsUnavailable):
    """The Inception weights of rFID are missing."""


class VisionBackboneUnavailable(PerceptualWeightsUnavailable):
    """The foundation model of the VF loss (DINOv2 ...) cannot be loaded; the message names the fix."""


class IncompatibleVAE(ValueError):
    """A VAE that cannot replace a pipeline's VAE (latent channels or convention differ)."""


# What the CLI reports in one line (LATENT_VAE_DEBUG=1 shows the traceback).
USER_ERRORS = (ConfigError, DataError, PerceptualWeightsUnavailable, CheckpointError, ImageReadError,
               FileNotFoundError, PermissionError, NotADirectoryError)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``name`` is a config key (``train.lr_schedule``) or a flag (``--dtype``)."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; use one of: {', '.join(map(str, choices))}")


def check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """A finite number > 0 (or >= 0): NaN and infinity are refused here, not by torch later."""
    check_finite(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be a finite number {bound}")
