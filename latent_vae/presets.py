"""Architecture presets on the stock diffusers classes (ground floor: imports nothing from latent_vae
but errors).

Every preset is a set of constructor arguments for ``diffusers.AutoencoderKL``, ``diffusers.VQModel`` or
``diffusers.AutoencoderTiny`` (trained from scratch, or as a distillation student): what we train is exactly
what users load later with ``from_pretrained``. Sources of the numbers are given per preset.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict

from diffusers import AutoencoderKL, AutoencoderTiny, VQModel

from .errors import ConfigError

# The latent regularisers: KL for AutoencoderKL, VQ for VQModel, none for AutoencoderTiny (TAESD's design:
# a deterministic encoder, nothing to regularise).
REGULARIZER_KINDS = ("kl", "vq", "none")


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
    "tiny-kl-f4": Preset(
        AutoencoderKL,
        dict(**_blocks(3), block_out_channels=(16, 32, 32), layers_per_block=1,
             latent_channels=8, norm_num_groups=8, scaling_factor=1.0),
        "f4, 8 channels, ~0.25M parameters: the CPU quickstart (measured in docs/BENCHMARKS.md: tiny-kl's f8 "
        "latent stays near 15 dB on held-out photos within a CPU-minutes budget; f4 learns several times faster)",
    ),
    "tiny-taesd-f4": Preset(
        AutoencoderTiny,
        dict(encoder_block_out_channels=(32, 32, 32), decoder_block_out_channels=(32, 32, 32),
             num_encoder_blocks=(1, 2, 2), num_decoder_blocks=(2, 2, 1), latent_channels=8),
        "TAESD's norm-free design at f4, width 32, 8 channels, ~0.32M parameters: the CPU quickstart (measured in "
        "docs/BENCHMARKS.md: without GroupNorm it learns colour where tiny-kl-f4 stays tinted)",
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


def _find(presets: Dict[str, Preset], name: str, key: str) -> Preset:
    """``presets[name]``, or a ConfigError naming the config ``key``, the closest name and all names."""
    if name not in presets:
        close = difflib.get_close_matches(name, presets.keys(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown {key} '{name}'{hint} (available: {', '.join(presets)})")
    return presets[name]


def check_preset(name: str) -> Preset:
    return _find(PRESETS, name, "model.preset")


def class_kind(cls: type) -> str:
    """``kl``, ``vq`` or ``none``: the regulariser a model class trains with."""
    return {VQModel: "vq", AutoencoderTiny: "none"}.get(cls, "kl")


def preset_kind(name: str) -> str:
    """``kl``, ``vq`` or ``none``: the regulariser preset ``name`` trains with."""
    return class_kind(check_preset(name).cls)


# --------------------------------------------------------------------------- distillation students

# Constructor arguments of ``diffusers.AutoencoderTiny`` (TAESD). Its encoder and decoder keep one width
# through all levels (a level's first convolution takes the previous level's width as its own), so a size
# is a single width plus the number of blocks per level.
STUDENT_PRESETS: Dict[str, Preset] = {
    "taesd": Preset(
        AutoencoderTiny,
        dict(encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
             num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1)),
        "TAESD as published (madebyollin/taesd, diffusers' AutoencoderTiny defaults): width 64, "
        "encoder blocks 1,3,3,3, decoder blocks 3,3,3,1; ~1.2M parameters each",
    ),
    "taesd-small": Preset(
        AutoencoderTiny,
        dict(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
             num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1)),
        "half TAESD's width, two blocks per level: ~0.2M parameters each, for previews on weak hardware",
    ),
    "taesd-large": Preset(
        AutoencoderTiny,
        dict(encoder_block_out_channels=(128, 128, 128, 128), decoder_block_out_channels=(128, 128, 128, 128),
             num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1)),
        "twice TAESD's width: ~4.9M parameters each, still ~10x cheaper to decode than the SD VAE",
    ),
}


def check_student_preset(name: str) -> Preset:
    return _find(STUDENT_PRESETS, name, "distill.student")
