"""Image -> tensor: resizing, cropping and flipping as training, validation and evaluation do it."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .images import check_pixel_count


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size``, aspect kept; ``ImageReadError`` if the result would be a bomb."""
    width, height = image.size
    scale = size / min(width, height)
    if scale == 1.0:
        return image
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    check_pixel_count(*new_size, f"resizing {width}x{height} to shorter side {size}")
    return image.resize(new_size, Image.BICUBIC, reducing_gap=3.0 if scale < 1 else None)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def crop_image(image: Image.Image, resolution: int, resize: Optional[int], crop: str, hflip: bool,
               rng: random.Random) -> Image.Image:
    """Resize the shorter side to ``resize`` (default: ``resolution``; 0 keeps the size, upscaling
    only images smaller than the crop), then a random or centre square crop, then a random flip."""
    return crop_resized(resize_for_crop(image, resolution, resize), resolution, crop, hflip, rng)


def resize_for_crop(image: Image.Image, resolution: int, resize: Optional[int]) -> Image.Image:
    """``crop_image``'s resize step: the same for every crop of an image, so it can be kept and reused."""
    target = resolution if resize is None else resize
    if target > 0:
        return resize_shorter_side(image, max(target, resolution))
    if min(image.size) < resolution:
        return resize_shorter_side(image, resolution)
    return image


def crop_resized(image: Image.Image, resolution: int, crop: str, hflip: bool, rng: random.Random) -> Image.Image:
    """``crop_image``'s crop and flip of an image ``resize_for_crop`` returned."""
    width, height = image.size
    if crop == "random":
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    else:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image
