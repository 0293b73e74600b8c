"""What an evaluation is asked to do: ``EvalOptions``, validated when built (``eval`` and ``compare``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..errors import ConfigError, check_choice, check_positive

PRECISIONS = ("fp32", "bf16", "fp16")
LPIPS_BACKBONES = ("alex", "vgg")
# The pool layers of torch-fidelity's InceptionV3 that rFID can use.
FID_FEATURE_SIZES = (64, 192, 768, 2048)


def _default_num_workers() -> int:
    from ..runtime import default_num_workers  # imports torch: not when the CLI only builds its parser

    return default_num_workers()


@dataclass
class EvalOptions:
    resolution: int = 256
    batch_size: int = 8
    num_workers: int = field(default_factory=lambda: _default_num_workers())  # a CPU left for the model
    sample: bool = False              # decode a posterior sample instead of the mean (KL)
    seed: int = 0                     # for ``sample``: image i uses derive_seed(seed, i)
    limit: Optional[int] = None       # evaluate the first N images only
    tiled: bool = False               # diffusers' tiled encode/decode (AutoencoderKL)
    tile_size: Optional[int] = None   # tile size in pixels (default: 512)
    tile_overlap: float = 0.25        # fraction of a tile shared with its neighbour (blended)
    precision: str = "fp32"           # autocast dtype of the model's forward; metrics in fp32
    lpips: Tuple[str, ...] = LPIPS_BACKBONES
    lpips_weights: Dict[str, str] = field(default_factory=dict)  # backbone -> local weights file
    fid: bool = True
    fid_weights: Optional[str] = None  # local InceptionV3 weights file
    fid_features: int = 2048
    grid_images: int = 8
    diffusability: bool = False       # latent spectrum, equivariance, channel statistics (evaluate/diffusability.py)
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive("--resolution", self.resolution)
        if self.resolution % 8:
            raise ConfigError(f"--resolution {self.resolution}: give a positive multiple of 8")
        check_choice("--precision", self.precision, PRECISIONS)
        if not 0.0 < self.tile_overlap < 1.0:
            raise ConfigError(f"--tile-overlap {self.tile_overlap}: give a fraction between 0 and 1")
        check_choice("--fid-features", self.fid_features, FID_FEATURE_SIZES)
        for backbone in self.lpips:
            check_choice("--lpips", backbone, LPIPS_BACKBONES)
