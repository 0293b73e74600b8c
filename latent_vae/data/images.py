"""Decoding one image safely into 8-bit RGB, whatever its file format or mode.

Used by training, encoding and evaluation alike, so every entry point treats a strange
file the same way: either it is converted correctly or an ``ImageReadError`` names the
file and the reason.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ImageReadError

# Alpha is composited over this background (what a viewer shows for a transparent PNG).
ALPHA_BACKGROUND = (255, 255, 255)


ImageInput = Union[str, Path, bytes, dict, Image.Image]


def _open(source: ImageInput) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # datasets' Image(decode=False) cell: {"bytes": ..., "path": ...}
        if source.get("bytes") is not None:
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path"):
            return Image.open(source["path"])
        raise ImageReadError("empty image cell (no bytes and no path)")
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def _full_scale(mode: str, array: np.ndarray) -> float:
    """The value that means white for a single-channel high-bit-depth image.

    ``I;16*``: 16-bit. ``I`` (signed 32-bit; PIL also uses it for 8- and 16-bit files): the
    smallest of 8, 16 and 31 bits that holds the values (negative values: the signed 32-bit range). ``F``: [0, 1], [0, 255] or [0, 65535]
    by the same rule, else the maximum (an unnormalised float image)."""
    top = float(array.max(initial=0))
    if mode.startswith("I;16"):
        return 65535.0
    ranges = (255.0, 65535.0, 2.0 ** 31 - 1) if mode == "I" else (1.0, 255.0, 65535.0)
    return next((r for r in ranges if top <= r), top)


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale modes, rescaled by their real range (never clipped to
    white); non-finite values are refused."""
    array = np.asarray(image).astype(np.float64)
    if not np.isfinite(array).all():
        raise ImageReadError("pixel values are not finite (NaN or infinity)")
    if image.mode == "I" and array.min(initial=0) < 0:  # signed 32-bit data: shift to unsigned
        array = array + 2.0 ** 31
        scale = 255.0 / (2.0 ** 32 - 1)
    else:
        scale = 255.0 / _full_scale(image.mode, array)
    return Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert through an embedded ICC profile to sRGB (an Adobe RGB photo read as sRGB looks
    washed out); untagged and sRGB-tagged images are left as they are."""
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(profile).lower().replace(" ", ""):
            return image
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        source = image.convert({"RGBA": "RGB", "LA": "L"}.get(image.mode, image.mode))
        converted = ImageCms.profileToProfile(source, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as err:
        raise ImageReadError(f"its embedded ICC colour profile cannot be applied ({err})") from None
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit sRGB: EXIF orientation applied, embedded colour profile converted to sRGB, alpha
    composited over white, high bit depth rescaled by its range."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_bit_depth_to_8bit(image)
    else:
        image = _to_srgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


@contextlib.contextmanager
def _read_errors():
    """Turn whatever PIL raises for a bad file into ImageReadError; bombs are refused early."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageReadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageReadError(f"refused: too many pixels (decompression bomb guard): {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError("not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as err:
        raise ImageReadError(f"{type(err).__name__}: {err}") from None


def _check_size(image: Image.Image) -> None:
    if image.width < 1 or image.height < 1:
        raise ImageReadError(f"empty image ({image.width}x{image.height})")
    # Checked here as well as through PIL's warning: warning filters are process-global, so under
    # the threads of a folder scan another thread may restore them while this one opens a file.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ImageReadError(f"refused: too many pixels (decompression bomb guard): {image.width}x{image.height} "
                             f"= {image.width * image.height} pixels, over PIL.Image.MAX_IMAGE_PIXELS ({limit})")


def load_image(source: ImageInput) -> Image.Image:
    """Decode ``source`` (path, bytes, datasets cell or PIL image) to 8-bit RGB.

    Refuses decompression bombs (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``) before
    decoding them, and truncated or non-image files, with ``ImageReadError``.
    """
    with _read_errors():
        image = _open(source)
        _check_size(image)
        image.load()
        return to_rgb(image)


def check_pixel_count(width: int, height: int, what: str) -> None:
    """The decompression-bomb limit applied to an image about to be created (a resize target):
    a 200000x1 file passes the file check but its shorter-side resize would not."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageReadError(f"refused: {what} would be {width}x{height} = {width * height} pixels, over "
                             f"PIL.Image.MAX_IMAGE_PIXELS ({limit}); the aspect ratio is too extreme")


def check_header(source: ImageInput) -> None:
    """Cheap validity check without decoding pixels: format, size and the bomb limit."""
    with _read_errors():
        with _open(source) as image:
            _check_size(image)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image (3, H, W) in [-1, 1] -> 8-bit RGB."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


GRID_PADDING = 2


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """Images (N, 3, H, W) in [-1, 1] tiled row by row, ``GRID_PADDING`` px of black between tiles.
    Reconstruction grids pass inputs then reconstructions with ``columns`` = batch: inputs above."""
    import torchvision

    grid = torchvision.utils.make_grid(images.float().clamp(-1, 1).cpu(), nrow=columns, padding=GRID_PADDING,
                                       pad_value=-1.0)
    return to_pil(grid)
