"""Architecture presets on the stock diffusers classes, and loading of existing VAEs.

Every preset is a set of constructor arguments for ``diffusers.AutoencoderKL`` or
``diffusers.VQModel``: what we train is exactly what users load later with
``from_pretrained``. Sources of the numbers are given per preset.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from diffusers import AutoencoderKL, VQModel

from .config import ConfigError, ModelConfig

Autoencoder = Union[AutoencoderKL, VQModel]


def _blocks(levels: int, attention_last: bool = False) -> Dict[str, tuple]:
    """diffusers block types for `levels` resolution levels.

    The encoder's last down block and the decoder's first up block run at the lowest
    resolution; ``attention_last`` adds self-attention there (latent-diffusion's
    ``attn_resolutions`` at the bottleneck resolution).
    """
    down = ["DownEncoderBlock2D"] * levels
    up = ["UpDecoderBlock2D"] * levels
    if attention_last:
        down[-1] = "AttnDownEncoderBlock2D"
        up[0] = "AttnUpDecoderBlock2D"
    return {"down_block_types": tuple(down), "up_block_types": tuple(up)}


@dataclass(frozen=True)
class Preset:
    cls: type
    kwargs: Dict[str, Any]
    source: str


PRESETS: Dict[str, Preset] = {
    "kl-f8": Preset(
        AutoencoderKL,
        dict(**_blocks(4), block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             latent_channels=4, norm_num_groups=32, scaling_factor=0.18215),
        "Stable Diffusion VAE (latent-diffusion kl-f8: ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4)",
    ),
    "kl-f8-c16": Preset(
        AutoencoderKL,
        dict(**_blocks(4), block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             latent_channels=16, norm_num_groups=32, scaling_factor=1.0),
        "kl-f8 with 16 latent channels (as in SD3/FLUX-style VAEs); scaling factor set from data",
    ),
    "kl-f4": Preset(
        AutoencoderKL,
        dict(**_blocks(3), block_out_channels=(128, 256, 512), layers_per_block=2,
             latent_channels=3, norm_num_groups=32, scaling_factor=1.0),
        "latent-diffusion kl-f4 (ch_mult 1,2,4, z 3); scaling factor set from data",
    ),
    "kl-f16": Preset(
        AutoencoderKL,
        dict(**_blocks(5, attention_last=True), block_out_channels=(128, 128, 256, 256, 512),
             layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=1.0),
        "latent-diffusion kl-f16 (ch_mult 1,1,2,2,4, z 16, attention at 16); scaling factor set from data",
    ),
    "tiny-kl": Preset(
        AutoencoderKL,
        dict(**_blocks(4), block_out_channels=(16, 32, 32, 32), layers_per_block=1,
             latent_channels=4, norm_num_groups=8, scaling_factor=1.0),
        "f8, 4 channels, ~0.3M parameters: tests and CPU demos",
    ),
    "vq-f4": Preset(
        VQModel,
        dict(**_blocks(3), block_out_channels=(128, 256, 512), layers_per_block=2,
             latent_channels=3, vq_embed_dim=3, num_vq_embeddings=8192, norm_num_groups=32,
             scaling_factor=1.0),
        "latent-diffusion vq-f4 (8192 codes of dim 3, ch_mult 1,2,4, no attention)",
    ),
    "vq-f8": Preset(
        VQModel,
        dict(**_blocks(4, attention_last=True), block_out_channels=(128, 256, 256, 512),
             layers_per_block=2, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=16384,
             norm_num_groups=32, scaling_factor=1.0),
        "latent-diffusion vq-f8 (16384 codes of dim 4, ch_mult 1,2,2,4, attention at 32)",
    ),
    "vq-f16": Preset(
        VQModel,
        dict(**_blocks(5, attention_last=True), block_out_channels=(128, 128, 256, 256, 512),
             layers_per_block=2, latent_channels=256, vq_embed_dim=8, num_vq_embeddings=16384,
             norm_num_groups=32, scaling_factor=1.0),
        "LlamaGen VQ-16 (16384 codes of dim 8 behind a 256-channel bottleneck, ch_mult 1,1,2,2,4)",
    ),
    "tiny-vq": Preset(
        VQModel,
        dict(**_blocks(4), block_out_channels=(16, 32, 32, 32), layers_per_block=1,
             latent_channels=4, vq_embed_dim=4, num_vq_embeddings=256, norm_num_groups=8,
             scaling_factor=1.0),
        "f8, 256 codes of dim 4, ~0.3M parameters: tests and CPU demos",
    ),
}


def check_preset(name: str) -> Preset:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS.keys(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model.preset '{name}'{hint} (available: {', '.join(PRESETS)})")
    return PRESETS[name]


def build_autoencoder(cfg: ModelConfig) -> Autoencoder:
    """The diffusers model a run trains: a preset, or an existing VAE (``model.pretrained``)."""
    if cfg.pretrained:
        if cfg.config:
            raise ConfigError(
                "model.config cannot change the architecture of model.pretrained; "
                "remove model.config or train from a preset"
            )
        return load_autoencoder(cfg.pretrained, subfolder=cfg.subfolder)
    preset = check_preset(cfg.preset)
    kwargs = {**preset.kwargs, **cfg.config}
    try:
        return preset.cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model.config does not fit {preset.cls.__name__}: {err}") from None


def load_autoencoder(name_or_path: str, subfolder: Optional[str] = None) -> Autoencoder:
    """An ``AutoencoderKL`` or ``VQModel`` from a diffusers folder or a hub id.

    Only safetensors weights are read: a folder holding pickled ``.bin`` weights is refused
    (convert it with ``diffusers`` ``save_pretrained(safe_serialization=True)`` first).
    """
    local = Path(name_or_path)
    if local.exists() and not local.is_dir():
        raise FileNotFoundError(
            f"{name_or_path} is a file, not a diffusers model folder; for a single-file "
            f"checkpoint run `latent-vae import --checkpoint {name_or_path} --output-dir DIR` first"
        )
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a diffusers model folder (no config.json)")
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    else:
        class_name = AutoencoderKL.load_config(name_or_path, subfolder=subfolder).get(
            "_class_name", "AutoencoderKL"
        )
    cls = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}.get(class_name)
    if cls is None:
        raise ValueError(f"{name_or_path}: {class_name} is not supported (AutoencoderKL or VQModel)")
    try:
        return cls.from_pretrained(name_or_path, subfolder=subfolder, use_safetensors=True)
    except (OSError, EnvironmentError) as err:
        if "safetensors" in str(err).lower() or "model.safetensors" in str(err):
            raise OSError(
                f"{name_or_path}: no safetensors weights found. Pickled .bin/.pt weights are "
                "refused because loading them can execute code; convert them to safetensors first."
            ) from None
        raise


def is_vq(model: Autoencoder) -> bool:
    return isinstance(model, VQModel)


def downsample_factor(model: Autoencoder) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


def latent_channels(model: Autoencoder) -> int:
    if is_vq(model):
        return model.config.vq_embed_dim or model.config.latent_channels
    return model.config.latent_channels


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def reconstruct(model: Autoencoder, images: torch.Tensor, sample: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Inference reconstruction as stock diffusers computes it.

    KL: decode the posterior mean (``sample=True``: a posterior sample). VQ: nearest-code
    lookup in ``quantize.embedding`` inside ``VQModel.decode``.
    """
    if is_vq(model):
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
