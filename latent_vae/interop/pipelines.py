"""Putting one of our autoencoders into an existing diffusers pipeline, with the checks that matter.

The plain diffusers way works as is (our models are stock classes)::

    pipe = StableDiffusionPipeline.from_pretrained(sd_id, vae=AutoencoderKL.from_pretrained("runs/ft/model"))

``swap_vae(pipe, vae)`` does the same on a loaded pipeline (``vae`` component; ``vqvae`` for
``LDMPipeline``; ``vae`` may be a distilled ``AutoencoderTiny``) after checking what would otherwise
fail silently: the latent channels and the downsampling factor must match the diffusion model's; a
different scaling (``scaling_factor``, ``shift_factor``, ``latents_mean``/``latents_std``) is reported;
and the encoders are compared on a few photographs — when B's latents drift from the original VAE's by more than
``evaluate.compare.CHECK_DRIFT`` (that module says why), a ``LatentDriftWarning`` says the diffusion
model was not trained on this latent space.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Dict, Optional

import torch

from ..data.sources import sample_photo_sources
from ..data.transforms import crop_image, to_tensor
from ..errors import IncompatibleVAE
from ..evaluate.compare import CHECK_DRIFT, latent_drift
from ..models.stock import Autoencoder, downsample_factor, is_tiny, is_vq, latent_channels

VAE_COMPONENTS = ("vae", "vqvae")
SCALING_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


class LatentDriftWarning(UserWarning):
    """The new autoencoder's encoder maps images to different latents than the pipeline's original."""


def check_images(resolution: int = 256) -> torch.Tensor:
    """Real photographs bundled with scikit-image, centre-cropped, in [-1, 1]: the default drift probe."""
    _, source = sample_photo_sources()
    crops = [crop_image(source.read(i), resolution, None, "center", False, random.Random(0))
             for i in range(len(source))]
    return torch.stack([to_tensor(c) for c in crops])


def _component_name(pipeline) -> str:
    components = getattr(pipeline, "components", {})
    for name in VAE_COMPONENTS:
        if name in components:
            return name
    raise IncompatibleVAE(f"{type(pipeline).__name__} has no autoencoder component ({' or '.join(VAE_COMPONENTS)})")


def _expected_latent_channels(pipeline, old: Optional[Autoencoder]) -> Optional[int]:
    if old is not None:
        return latent_channels(old)
    unet = getattr(pipeline, "unet", None)
    return unet.config.in_channels if unet is not None else None


def swap_vae(pipeline, vae: Autoencoder, probe_images: Optional[torch.Tensor] = None,
             drift_threshold: float = CHECK_DRIFT, check_drift: bool = True) -> Dict[str, Any]:
    """Install ``vae`` as the pipeline's autoencoder; returns what was checked.

    Raises ``IncompatibleVAE`` when the kind (KL/VQ), latent channels or downsampling factor
    differ from the pipeline's. Warns (``LatentDriftWarning``) when the latents of
    ``probe_images`` (default: ``check_images()``) drift from the original encoder's by more
    than ``drift_threshold`` (relative L2 of scaled latents), and when the scaling differs.
    ``vae`` is moved to the original's device and dtype.
    """
    name = _component_name(pipeline)
    old = getattr(pipeline, name)
    if old is not None and is_vq(old) != is_vq(vae):
        raise IncompatibleVAE(f"the pipeline's {name} is a {type(old).__name__}; got a {type(vae).__name__}")
    expected = _expected_latent_channels(pipeline, old)
    if expected is not None and latent_channels(vae) != expected:
        raise IncompatibleVAE(f"the new autoencoder has {latent_channels(vae)} latent channels; the pipeline's "
                              f"diffusion model works on {expected}")
    if old is not None and downsample_factor(vae) != downsample_factor(old):
        raise IncompatibleVAE(f"the new autoencoder downsamples by {downsample_factor(vae)}, the pipeline's by "
                              f"{downsample_factor(old)}: the diffusion model's latent grid would change")
    report: Dict[str, Any] = {"component": name, "latent_channels": latent_channels(vae), "drift": None,
                              "scaling_changes": {}}
    if old is None:
        pipeline.register_modules(**{name: vae})
        return report
    vae.to(old.device).eval()
    if vae.dtype != old.dtype:
        vae.to(dtype=old.dtype)
    # A distilled AutoencoderTiny's latents are the pipeline's scaled latents (its own scaling is the identity):
    # its convention is measured by the drift check below, not read from scaling keys. One trained from
    # scratch has its own scaling_factor, compared like any other model's.
    changes = {} if _identity_scaled_tiny(vae) or _identity_scaled_tiny(old) else {
        k: (old.config.get(k), vae.config.get(k)) for k in SCALING_KEYS if old.config.get(k) != vae.config.get(k)}
    report["scaling_changes"] = changes
    if changes:
        warnings.warn("latent scaling differs from the pipeline's original autoencoder: "
                      + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
                      + "; the drift check below measures the effect on the diffusion model's inputs",
                      LatentDriftWarning, stacklevel=2)
    if check_drift:
        images = probe_images if probe_images is not None else check_images()
        report["drift"] = drift = latent_drift(old, vae, images)
        if drift["scaled_relative_l2"] > drift_threshold:
            warnings.warn(
                f"the new encoder's scaled latents differ from the original's by {drift['scaled_relative_l2']:.3f} "
                f"(relative L2, threshold {drift_threshold}): the diffusion model was trained on a different "
                "latent space; expect degraded samples unless it is fine-tuned (a decoder-only fine-tune "
                "keeps the latents)", LatentDriftWarning, stacklevel=2)
    pipeline.register_modules(**{name: vae})
    return report


def _identity_scaled_tiny(model: Autoencoder) -> bool:
    return is_tiny(model) and model.config.scaling_factor == 1.0 and not model.config.get("shift_factor")
