"""Paths through latent space between the latents of two or more images.

Each image's latent (a whole ``(C, h, w)`` tensor, seen as one vector) is interpolated to the
next in the *scaled* latent space (``models.stock.to_diffusion_latents``), where data latents are centred: with a
``shift_factor`` or ``latents_mean`` the origin of the model latents is not the centre, and a
spherical path around it would be meaningless. Without them the scaled space is the model
space times ``scaling_factor``, and both methods give the same path in either space.

- ``linear``: (1 − t)·a + t·b.
- ``slerp``: the direction moves along the great circle from a/‖a‖ to b/‖b‖ at constant angular
  speed, the norm goes linearly from ‖a‖ to ‖b‖: ‖slerp(a, b, t)‖ = (1 − t)‖a‖ + t‖b‖ exactly.
  For two latents of equal norm this is classic slerp, which keeps the norm. When a and b are
  parallel or anti-parallel (no unique great circle) or one is zero, it is the linear path.

Why slerp: for Gaussian-like latents in d dimensions norms concentrate around √d, and the
linear midpoint of two independent latents has norm ≈ √(d/2) — a latent the decoder never
saw (typically washed-out images). Slerp stays on the shell the data lives on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import torch

from ..data.images import image_grid, to_pil
from ..data.sources import Failure, ImageSource
from ..errors import ConfigError, check_choice
from ..models.stock import Autoencoder, decoder_latents, from_diffusion_latents, to_diffusion_latents
from .common import check_resolution, decode_latents, load_images, require_images, write_failures

METHODS = ("slerp", "linear")
ANIMATION_FORMATS = ("gif", "webp")
# Below this sine of the angle between a and b (about 6e-6 degrees) there is no usable great circle.
_PARALLEL_SINE = 1e-7


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return (1.0 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the direction, linear interpolation of the norm (module docstring).

    ``a`` and ``b`` are each one vector, whatever their shape; computed in float64.
    """
    u, v = a.double().flatten(), b.double().flatten()
    norm_a, norm_b = u.norm(), v.norm()
    if norm_a == 0 or norm_b == 0:
        return lerp(a, b, t)
    u, v = u / norm_a, v / norm_b
    angle = torch.arccos(torch.clamp(u @ v, -1.0, 1.0))
    sine = torch.sin(angle)
    if sine < _PARALLEL_SINE:
        return lerp(a, b, t)
    direction = (torch.sin((1.0 - t) * angle) * u + torch.sin(t * angle) * v) / sine
    norm = (1.0 - t) * norm_a + t * norm_b
    return (direction * norm).reshape(a.shape).to(a.dtype)


def interpolation_path(latents: torch.Tensor, steps: int, method: str = "slerp") -> torch.Tensor:
    """Latents (N, C, h, w) -> (N − 1, steps, C, h, w): segment i goes from latent i (t = 0)
    to latent i + 1 (t = 1) in ``steps`` evenly spaced values of t."""
    check_choice("--method", method, METHODS)
    if steps < 2:  # check_positive's bound is 0; a path needs its two endpoints
        raise ConfigError(f"--steps={steps!r} must be at least 2 (the two endpoints)")
    mix = slerp if method == "slerp" else lerp
    times = torch.linspace(0.0, 1.0, steps).tolist()
    return torch.stack([
        torch.stack([mix(start, end, t) for t in times])
        for start, end in zip(latents[:-1], latents[1:])
    ])


@torch.no_grad()
def latent_path(model: Autoencoder, pixels: torch.Tensor, steps: int = 8, method: str = "slerp") -> torch.Tensor:
    """Images (N ≥ 2, 3, R, R) in [-1, 1] -> model latents along the path, (N − 1, steps, C, h, w),
    interpolated in the scaled latent space (module docstring)."""
    scaled = to_diffusion_latents(model, decoder_latents(model, pixels.to(model.device)))
    return from_diffusion_latents(model, interpolation_path(scaled, steps, method))


def interpolate_images(model: Autoencoder, pixels: torch.Tensor, steps: int = 8, method: str = "slerp") -> torch.Tensor:
    """Images (N ≥ 2, 3, R, R) in [-1, 1] -> decoded path (N − 1, steps, 3, R, R).

    Frame 0 of segment i decodes image i's latent (its reconstruction), the last frame image
    i + 1's.
    """
    path = latent_path(model, pixels, steps, method)
    decoded = decode_latents(model, path.flatten(0, 1))
    return decoded.reshape(*path.shape[:2], *decoded.shape[1:])


def animation_frames(frames: torch.Tensor) -> torch.Tensor:
    """(segments, steps, 3, H, W) -> the path as one sequence, each shared endpoint once."""
    return torch.cat([frames[0], *[segment[1:] for segment in frames[1:]]])


@dataclass
class InterpolationResult:
    grid: Path
    animation: Path
    frames: torch.Tensor  # (segments, steps, 3, R, R) in [-1, 1]
    keys: List[str]
    failures: List[Failure]


def write_interpolation(model: Autoencoder, source: ImageSource, output_dir: str | Path, resolution: int,
                        steps: int = 8, method: str = "slerp", animation: str = "gif",
                        frame_ms: int = 120, known_failures: Sequence[Failure] = ()) -> InterpolationResult:
    """Interpolate along the readable images of ``source`` in order; write ``interpolation_grid.png``
    (one row per segment, one column per step), ``interpolation.<gif|webp>`` (the whole path) and
    ``unreadable.csv`` (``known_failures`` — e.g. from ``open_inputs`` — and inputs that failed to decode)."""
    check_choice("--format", animation, ANIMATION_FORMATS)
    check_resolution(model, resolution)
    keys, pixels, read_failures = load_images(source, resolution)
    failures = [*known_failures, *read_failures]
    pixels = require_images(pixels, failures, 2, "interpolation")
    frames = interpolate_images(model, pixels, steps, method)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    grid_path = output_dir / "interpolation_grid.png"
    image_grid(frames.flatten(0, 1), columns=steps).save(grid_path)
    sequence = [to_pil(frame) for frame in animation_frames(frames)]
    animation_path = output_dir / f"interpolation.{animation}"
    sequence[0].save(animation_path, save_all=True, append_images=sequence[1:], duration=frame_ms, loop=0,
                     **({"lossless": True} if animation == "webp" else {}))
    write_failures(failures, output_dir / "unreadable.csv")
    return InterpolationResult(grid_path, animation_path, frames, keys, failures)

