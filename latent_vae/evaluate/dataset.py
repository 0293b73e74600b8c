"""The images an evaluation reads: resized (shorter side) and centre-cropped, in batches.

Unreadable inputs become ``Failure`` entries of the batch instead of exceptions, so one bad file
is skipped and reported by key and reason. ``eval``, ``compare`` and the latent tools read images
this way.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Sequence

import torch

from ..data.sources import Failure, ImageSource
from ..data.transforms import crop_image, to_tensor
from ..errors import ImageReadError
from .options import EvalOptions


class EvalDataset(torch.utils.data.Dataset):
    """Images of a source, resized (shorter side) and centre-cropped; failures reported, not raised."""

    def __init__(self, source: ImageSource, indices: Sequence[int], resolution: int):
        self.source, self.indices, self.resolution = source, list(indices), resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Dict[str, Any]:
        index = self.indices[position]
        item: Dict[str, Any] = {"index": index, "pixel_values": None, "failure": None, "upscaled": False}
        try:
            image = self.source.read(index)
            item["upscaled"] = min(image.size) < self.resolution
            image = crop_image(image, self.resolution, None, "center", False, random.Random(0))
        except ImageReadError as err:
            item["failure"] = Failure(self.source.key(index), str(err))
            return item
        item["pixel_values"] = to_tensor(image)
        return item


def collate_eval_batch(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    kept = [i for i in items if i["pixel_values"] is not None]
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in kept]) if kept else None,
        "indices": [i["index"] for i in kept],
        "upscaled": [i["upscaled"] for i in kept],
        "failures": [i["failure"] for i in items if i["failure"] is not None],
    }


def eval_loader(source: ImageSource, indices: Sequence[int], options: EvalOptions,
                device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of ``collate_eval_batch`` over the images ``indices`` of ``source`` (a process's shard)."""
    return torch.utils.data.DataLoader(
        EvalDataset(source, indices, options.resolution), batch_size=options.batch_size,
        collate_fn=collate_eval_batch, num_workers=options.num_workers, pin_memory=device.type == "cuda",
    )


def load_eval_images(source: ImageSource, indices: Sequence[int], resolution: int) -> torch.Tensor:
    """The images ``indices`` of ``source`` (all readable) as one batch (N, 3, R, R) in [-1, 1]."""
    dataset = EvalDataset(source, indices, resolution)
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
