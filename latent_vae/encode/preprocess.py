"""Images in: resize + centre crop (square, or SDXL's aspect-ratio buckets), recorded per row,
and the DataLoader side of encoding (uint8 pixels, grouped by size)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

from ..data.images import check_pixel_count
from ..data.sources import ImageSource
from ..errors import ImageReadError

# SDXL's multi-aspect training buckets at 1024² (height, width), from the SDXL report
# (Podell et al. 2023, appendix "multi-aspect training"): aspect ratios 1/4 to 4, sides
# multiples of 64, about 1024² pixels each.
SDXL_BUCKETS: Tuple[Tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)


@functools.lru_cache(maxsize=None)
def bucket_sizes(resolution: int, multiple: int) -> Tuple[Tuple[int, int], ...]:
    """SDXL's buckets scaled from 1024² to ``resolution``² pixels, each side rounded to a
    multiple of ``multiple``: the VAE's downsampling factor × the denoiser's patch size, so
    latents have integer sides that a patch-2 transformer (DiT, SD3, FLUX) can cut into patches."""
    sizes: List[Tuple[int, int]] = []
    for height, width in SDXL_BUCKETS:
        size = tuple(max(multiple, round(side * resolution / 1024 / multiple) * multiple) for side in (height, width))
        if size not in sizes:
            sizes.append(size)
    return tuple(sizes)


class SkippedInput(Exception):
    """A readable image that the preprocessing options exclude (the reason says which)."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize so the image covers the target, then centre-crop to it; the target is
    ``resolution``² or, with ``buckets="sdxl"``, the bucket closest in aspect ratio."""

    resolution: int
    buckets: str = "none"
    upscale: bool = True
    multiple: int = 16  # bucket sides: the VAE factor × the patch size

    def target_size(self, width: int, height: int) -> Tuple[int, int]:
        """(height, width) of the crop for an image of the given size."""
        if self.buckets == "none":
            return self.resolution, self.resolution
        aspect = math.log(width / height)
        return min(bucket_sizes(self.resolution, self.multiple), key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))

    def __call__(self, image: Image.Image) -> Tuple[Image.Image, Dict[str, Any]]:
        width, height = image.size
        target_h, target_w = self.target_size(width, height)
        scale = max(target_h / height, target_w / width)
        if scale > 1 and not self.upscale:
            raise SkippedInput(f"smaller than the {target_w}x{target_h} crop ({width}x{height}) and upscaling "
                               "is off (--no-upscale)")
        new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
        if (new_w, new_h) != (width, height):
            check_pixel_count(new_w, new_h, f"resizing {width}x{height} to cover {target_w}x{target_h}")
            image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0 if scale < 1 else None)
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
        image = image.crop((left, top, left + target_w, top + target_h))
        record = {"original_size": [height, width], "resized_size": [new_h, new_w], "crop_top_left": [top, left],
                  "target_size": [target_h, target_w], "upscaled": scale > 1}
        return image, record


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]: the arithmetic of ``data.to_tensor``, done on the
    device so that a quarter of the bytes cross the host-device link."""
    return pixels.float().div(127.5).sub(1.0)


def prepare(preprocessing: Preprocessing, image: Image.Image) -> Dict[str, Any]:
    """One input image as encode's workers hand it on: ``pixels`` (uint8, 3 × H × W; ``to_model_input``
    converts them on the device) and the preprocessing ``record``, or the ``failure`` that skips it."""
    try:
        image, record = preprocessing(image)
    except (ImageReadError, SkippedInput) as err:
        return {"failure": str(err)}
    return {"pixels": torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1), "record": record}


class EncodeInputs(torch.utils.data.Dataset):
    """Source index -> preprocessed uint8 image and its record, or the reason it is unusable."""

    def __init__(self, source: ImageSource, preprocessing: Preprocessing):
        self.source, self.preprocessing = source, preprocessing

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            image = self.source.read(index)
        except ImageReadError as err:
            return {"index": index, "failure": str(err)}
        return {"index": index, **prepare(self.preprocessing, image)}


def collate_by_size(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack images of equal size (one group per bucket); keep the failures apart."""
    groups: Dict[Tuple[int, ...], Dict[str, list]] = {}
    for sample in samples:
        if "pixels" in sample:
            group = groups.setdefault(tuple(sample["pixels"].shape), {"indices": [], "pixels": [], "records": []})
            group["indices"].append(sample["index"])
            group["pixels"].append(sample["pixels"])
            group["records"].append(sample["record"])
    return {
        "groups": [{**g, "pixels": torch.stack(g["pixels"])} for g in groups.values()],
        "failures": [(s["index"], s["failure"]) for s in samples if "failure" in s],
    }
