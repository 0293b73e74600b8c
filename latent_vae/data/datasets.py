"""Training and validation datasets over an image source, and the sampler that makes runs resumable."""

from __future__ import annotations

import random
from typing import Any, Dict, Iterator, List, Tuple

import torch
from PIL import Image

from ..config import DataConfig
from ..errors import DataError, ImageReadError
from ..seeding import derive_seed
from .sources import Failure, ImageSource
from .transforms import crop_image, crop_resized, resize_for_crop, to_tensor

_SAMPLE, _EPOCH = 0, 1  # seed namespaces


class TrainDataset(torch.utils.data.Dataset):
    """Training crops keyed by ``(index, seed)``; the seed drives crop, flip and posterior noise.

    An input that fails to decode is replaced by the next one in the source (deterministically)
    and reported in the sample's ``failures`` so the trainer can count and log it.

    Resized images are kept in memory, up to ``cache_bytes`` per process (each DataLoader worker
    holds its own), so a small set (the quickstart's photos) is decoded and resized once, not for
    every crop: without it the workers' decoding took a quarter of the quickstart's 2-core CPU
    time. Larger sets fill the budget and read the rest from the source as before. The crops are
    the same either way (tested).
    """

    def __init__(self, source: ImageSource, cfg: DataConfig, cache_bytes: int = 256 * 2**20):
        self.source, self.cfg = source, cfg
        self.cache_bytes, self._cached, self._cached_bytes = cache_bytes, {}, 0

    def __len__(self) -> int:
        return len(self.source)

    def describe(self) -> str:
        return f"{len(self.source)} training images from {self.source.name}"

    def sample_source(self, count: int) -> ImageSource:
        """The first ``count`` training images (previews, the exported scaling factor)."""
        return self.source.subset(range(min(count, len(self.source))))

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, Any]:
        index, seed = key
        failures = []
        for offset in range(len(self.source)):
            position = (index + offset) % len(self.source)
            try:
                image = crop_resized(self._resized(position), self.cfg.resolution, self.cfg.crop, self.cfg.hflip,
                                     random.Random(seed))
                break
            except ImageReadError as err:
                failures.append(Failure(self.source.key(position), str(err)))
        else:
            raise DataError(f"none of the {len(self.source)} images in {self.source.name} can be decoded")
        return {"pixel_values": to_tensor(image), "seed": seed, "failures": failures}

    def _resized(self, position: int) -> Image.Image:
        image = self._cached.get(position)
        if image is None:
            image = resize_for_crop(self.source.read(position), self.cfg.resolution, self.cfg.resize)
            size = image.width * image.height * len(image.getbands())
            if self._cached_bytes + size <= self.cache_bytes:
                image.load()
                self._cached[position], self._cached_bytes = image, self._cached_bytes + size
        return image


class ValidationDataset(torch.utils.data.Dataset):
    """Fixed validation crops: the centre crop, or ``crops`` seeded random crops per image."""

    def __init__(self, source: ImageSource, cfg: DataConfig, crops: int = 1):
        self.source, self.cfg, self.crops = source, cfg, crops

    def __len__(self) -> int:
        return len(self.source) * self.crops

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image_index, crop_index = divmod(index, self.crops)
        mode = "center" if self.crops == 1 else "random"
        try:
            image = crop_image(self.source.read(image_index), self.cfg.resolution, self.cfg.resize, mode, False,
                               random.Random(index))
        except ImageReadError as err:
            return {"pixel_values": None, "failures": [Failure(self.source.key(image_index), str(err))]}
        return {"pixel_values": to_tensor(image), "failures": []}


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack the images; keep per-sample seeds and the failures met while loading them."""
    kept = [s for s in samples if s["pixel_values"] is not None]
    batch: Dict[str, Any] = {
        "pixel_values": torch.stack([s["pixel_values"] for s in kept]) if kept else None,
        "failures": [f for s in samples for f in s["failures"]],
    }
    if kept and "seed" in kept[0]:
        batch["seeds"] = torch.tensor([s["seed"] for s in kept], dtype=torch.int64)
    return batch


class TrainBatchSampler(torch.utils.data.Sampler):
    """Infinite stream of batches of ``(index, seed)`` keys for one process.

    The sample stream is the concatenation of per-epoch permutations seeded by
    ``(seed, epoch)``. Micro-batch ``k`` of process ``r`` out of ``P`` holds stream positions
    ``[(k·P + r)·B, (k·P + r + 1)·B)``; ``start_batch`` resumes mid-stream without replay.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0,
                 num_processes: int = 1, start_batch: int = 0):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.num_processes, self.start_batch = rank, num_processes, start_batch
        self._epoch, self._perm = -1, None

    def _key(self, position: int) -> Tuple[int, int]:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, _EPOCH, epoch))
            self._perm, self._epoch = torch.randperm(self.num_items, generator=generator).tolist(), epoch
        return self._perm[offset], derive_seed(self.seed, _SAMPLE, position)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        batch_index = self.start_batch
        while True:
            first = (batch_index * self.num_processes + self.rank) * self.batch_size
            yield [self._key(first + j) for j in range(self.batch_size)]
            batch_index += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs this for len(), which we never call
        return 2**62
