"""diffusers' tiled encode/decode with consistent tile and overlap sizes."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from ..errors import ConfigError
from .stock import Autoencoder, downsample_factor, is_tiny, is_vq

DEFAULT_TILE_SIZE = 512  # diffusers' tile for the SD VAE; the config's sample_size is often a placeholder


def configure_tiling(model: Autoencoder, tile_size: Optional[int], overlap: float) -> None:
    """diffusers' tiled encode/decode with tiles of ``tile_size`` pixels (default 512) overlapping
    by ``overlap`` of a tile, blended linearly across the overlap. Images no larger than a tile
    are processed whole."""
    if is_vq(model):
        raise ConfigError("diffusers' VQModel has no tiled encode/decode; drop --tiled")
    if is_tiny(model):  # diffusers sizes its tiles for f8 (2 ** out_channels): an f4 model fails mid-way
        raise ConfigError("--tiled is for AutoencoderKL; diffusers' AutoencoderTiny tiling assumes an f8 model: "
                          "drop --tiled")
    factor = downsample_factor(model)
    size = tile_size or DEFAULT_TILE_SIZE
    if size % factor:
        raise ConfigError(f"--tile-size {size} is not a multiple of the model's downsampling factor {factor}")
    latent = size // factor
    # diffusers steps its tiles by int(tile·(1 − overlap)) and crops each blended tile to
    # tile − int(tile·overlap), in pixels on one side and latents on the other; unless the two
    # agree, tiles are misplaced and the output has the wrong size (overlap·latent tile whole).
    encode_stride, encode_crop = int(size * (1 - overlap)), (latent - int(latent * overlap)) * factor
    decode_stride, decode_crop = int(latent * (1 - overlap)) * factor, size - int(size * overlap)
    consistent = encode_stride == encode_crop and decode_stride == decode_crop
    if not consistent or int(latent * overlap) < 1:
        raise ConfigError(f"--tile-overlap {overlap} does not fit a {size}-pixel tile ({latent} latents): use a "
                          f"multiple of 1/{latent}, e.g. {max(1, latent // 4) / latent:g}")
    model.enable_tiling()
    model.tile_sample_min_size, model.tile_latent_min_size = size, latent
    model.tile_overlap_factor = overlap


_TILING_ATTRIBUTES = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


@contextlib.contextmanager
def tiling(model: Autoencoder, enabled: bool, tile_size: Optional[int], overlap: float) -> Iterator[None]:
    """``configure_tiling`` for the duration of the block (nothing when not ``enabled``)."""
    if not enabled:
        yield
        return
    saved = {name: getattr(model, name, None) for name in _TILING_ATTRIBUTES}
    configure_tiling(model, tile_size, overlap)  # refuses VQ models before any change
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(model, name, value)
