"""Training from a sharded stream (``data.shards`` or ``data.streaming``), resumable exactly.

The map-style pipeline (``datasets.py``) picks sample ``perm[position]``; a stream cannot index, so
here the same guarantees come from positions in shards:

- **Streams.** A process of global rank ``r`` (of ``P``) runs ``W = max(1, data.num_workers)`` loader
  workers; each plays one *stream* ``g = r·W + s`` of ``G = P·W``. In epoch ``e`` the shard list is
  permuted by ``(train.seed, e)`` (``data.shuffle_shards``) and stream ``g`` reads shards
  ``order[g::G]`` one after another, so the streams of an epoch read every shard exactly once. Each
  stream counts its own epochs (streams with smaller shards run ahead).
- **Shuffling.** A stream cuts its samples into blocks of ``data.shuffle_buffer`` and emits each block
  in an order seeded by ``(train.seed, g, block number)``. Unlike webdataset's sliding buffer, a block
  is reproducible from where it starts, which is what makes an exact resume possible.
- **Cursor.** Where a stream stands is a ``StreamCursor``: the block's start (epoch, shard, position
  in the shard) and how many of its samples were emitted. Every batch carries the cursor of its
  stream after it; ``StreamLoader`` keeps the cursor of the last batch *handed to training* from each
  stream (not what prefetching workers read ahead), and a checkpoint stores them per process.
  Resuming re-reads the current block from its start (a seek for tar, row-group skip for parquet),
  re-shuffles it identically and skips what was emitted: the batches that follow are the
  uninterrupted run's batches, sample for sample, crop for crop.
- **Workers.** The DataLoader takes batches from its workers round-robin; a resumed run that already
  consumed ``n`` batches gives worker ``w`` the stream ``(n + w) mod W``, so the round-robin goes on
  where it stopped.
- **Seeds.** Batch ``k`` of rank ``r`` holds positions ``(k·P + r)·B + j``; the crop, flip and posterior
  noise of a sample are seeded by its position, as in the map-style pipeline.

An exact resume needs the same shards, processes, workers, ``train.batch_size``, ``train.seed`` and
``data.shuffle_buffer``; otherwise the run says so and restarts the streams at the start of the
earliest epoch they had reached. A remote streaming 🤗 dataset resumes exactly only while its files do
not change (pin a revision).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError, ImageReadError
from ..seeding import derive_seed
from .datasets import TrainDataset, collate
from .images import load_image
from .sources import Failure, ImageSource, open_source, split_train_val
from .streams import ShardPosition, StreamSample, StreamSource, decode, open_stream
from .transforms import crop_image, to_tensor

logger = logging.getLogger("latent_vae")

_SAMPLE, _SHARD_ORDER, _BLOCK = 0, 2, 3  # seed namespaces (datasets.py uses 0 and 1 for the map-style sampler)
STATE_VERSION = 1


@dataclass(frozen=True)
class StreamCursor:
    """Where one stream stands: the start of its current block and the samples of it already emitted."""

    epoch: int = 0
    shard: int = 0  # index into the stream's shards of ``epoch``
    offset: int = 0  # ShardPosition in that shard
    index: int = 0
    block: int = 0  # blocks the stream has started (seeds the block's order)
    emitted: int = 0

    @property
    def position(self) -> ShardPosition:
        return ShardPosition(self.offset, self.index)


class StreamImages(ImageSource):
    """Samples read from a stream and kept in memory: validation images, preview and scaling images."""

    def __init__(self, samples: List[StreamSample], name: str):
        self.samples, self.name = samples, name

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        return self.samples[index].id

    def read(self, index: int):
        return load_image(self.samples[index].image)


def take_images(source: StreamSource, count: int, starts: Optional[Dict[str, ShardPosition]] = None
                ) -> Tuple[List[StreamSample], List[Failure], Dict[str, ShardPosition]]:
    """The first ``count`` decodable samples of ``source`` in shard order (from ``starts``), the failures
    met on the way, and the position after them in every shard read."""
    taken: List[StreamSample] = []
    failures: List[Failure] = []
    reached: Dict[str, ShardPosition] = {}
    starts = starts or {}
    for shard in source.shards:
        if len(taken) == count:
            break
        for sample in source.read(shard, starts.get(shard, ShardPosition())):
            reached[shard] = sample.next
            _, failure = decode(sample)
            if failure is None:
                taken.append(sample)
            else:
                failures.append(failure)
            if len(taken) == count:
                break
    return taken, failures, reached


class StreamTrainDataset:
    """The training side of a sharded input: the source, where each shard starts (after held-out
    validation samples), and the batches (``batches``) for one process."""

    def __init__(self, source: StreamSource, cfg: DataConfig, starts: Optional[Dict[str, ShardPosition]] = None):
        self.source, self.cfg, self.starts = source, cfg, dict(starts or {})

    def describe(self) -> str:
        return (f"a stream of {len(self.source.shards)} shards from {self.source.name} (shuffle_buffer "
                f"{self.cfg.shuffle_buffer}, {'exact' if self.source.exact_resume else 'revision-dependent'} resume)")

    def sample_source(self, count: int) -> ImageSource:
        """The first ``count`` readable training images (previews, the exported scaling factor)."""
        samples, _, _ = take_images(self.source, count, self.starts)
        if not samples:
            raise DataError(f"none of the samples of {self.source.name} can be decoded")
        return StreamImages(samples, self.source.name)

    def batches(self, batch_size: int, seed: int, rank: int, num_processes: int, start_batch: int = 0,
                state: Optional[Dict[str, Any]] = None) -> "StreamBatches":
        return StreamBatches(self, batch_size, seed, rank, num_processes, start_batch, state)


class StreamBatches(torch.utils.data.IterableDataset):
    """This process's infinite stream of training batches (see the module docstring); give it to a
    DataLoader with ``batch_size=None`` and ``data.num_workers`` workers."""

    def __init__(self, data: StreamTrainDataset, batch_size: int, seed: int, rank: int, num_processes: int,
                 start_batch: int = 0, state: Optional[Dict[str, Any]] = None):
        self.data, self.source, self.cfg = data, data.source, data.cfg
        self.batch_size, self.seed, self.rank, self.num_processes = batch_size, seed, rank, num_processes
        self.workers, self.start_batch = max(1, self.cfg.num_workers), start_batch
        self.streams = num_processes * self.workers
        if len(self.source.shards) < self.streams:
            raise DataError(
                f"{len(self.source.shards)} shards cannot feed {num_processes} processes × {self.workers} loader "
                f"workers = {self.streams} streams (each reads whole shards); lower data.num_workers or split the "
                "data into more shards")
        self.identity = self._identity()
        self.cursors = self._resume_cursors(state)

    # ------------------------------------------------------------------ what a checkpoint holds

    def _identity(self) -> Dict[str, Any]:
        """What must not change for an exact resume."""
        shards = hashlib.sha256("\n".join(self.source.shards).encode()).hexdigest()
        return {"version": STATE_VERSION, "shards": shards, "processes": self.num_processes, "workers": self.workers,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle_buffer": self.cfg.shuffle_buffer,
                "shuffle_shards": self.cfg.shuffle_shards, "starts": sorted((k, v.offset, v.index)
                                                                            for k, v in self.data.starts.items())}

    def state_dict(self, cursors: Dict[int, StreamCursor]) -> Dict[str, Any]:
        return {"identity": self.identity, "cursors": {str(s): asdict(c) for s, c in cursors.items()}}

    def _resume_cursors(self, state: Optional[Dict[str, Any]]) -> Dict[int, StreamCursor]:
        fresh = {s: self.epoch_start(s, 0) for s in range(self.workers)}
        if state is None:
            if self.start_batch:
                logger.warning("the checkpoint holds no position in the data stream: the stream starts over "
                               "(a resumed run normally continues exactly where it stopped)")
            return fresh
        cursors = {int(s): StreamCursor(**c) for s, c in state["cursors"].items()}
        if state["identity"] == self.identity:
            logger.info("data stream resumed exactly: %s", "; ".join(
                f"stream {self.rank * self.workers + s} at epoch {c.epoch}, shard {c.shard}, sample {c.index}"
                f" + {c.emitted} of block {c.block}" for s, c in sorted(cursors.items())))
            return cursors
        changed = sorted(k for k in self.identity if state["identity"].get(k) != self.identity[k])
        epoch = min((c.epoch for c in cursors.values()), default=0)
        logger.warning("the data stream cannot resume exactly (%s changed since the checkpoint): every stream "
                       "restarts at the start of epoch %d, so part of that epoch is seen again", ", ".join(changed),
                       epoch)
        return {s: self.epoch_start(s, epoch) for s in range(self.workers)}

    def epoch_start(self, local: int, epoch: int) -> StreamCursor:
        """The cursor at the first sample of an epoch of this process's stream ``local``."""
        start = self._start_of(self.shards_of(self.rank * self.workers + local, epoch)[0])
        return StreamCursor(epoch, 0, start.offset, start.index)

    def _start_of(self, shard: str) -> ShardPosition:
        """Where training reads a shard from: its start, or after the samples held out for validation."""
        return self.data.starts.get(shard, ShardPosition())

    # ------------------------------------------------------------------ reading

    def shards_of(self, stream: int, epoch: int) -> List[str]:
        shards = list(self.source.shards)
        if self.cfg.shuffle_shards:
            random.Random(derive_seed(self.seed, _SHARD_ORDER, epoch)).shuffle(shards)
        return shards[stream::self.streams]

    def sequence(self, stream: int, cursor: StreamCursor
                 ) -> Iterator[Tuple[StreamSample, Tuple[int, int, ShardPosition]]]:
        """The stream's samples from the cursor's block start on, forever, each with the position after it."""
        epoch, first, position = cursor.epoch, cursor.shard, cursor.position
        while True:
            shards, found = self.shards_of(stream, epoch), False
            whole_epoch = first == 0 and position == self._start_of(shards[0])
            for index in range(first, len(shards)):
                start = position if index == first else self._start_of(shards[index])
                for sample in self.source.read(shards[index], start):
                    found = True
                    yield sample, (epoch, index, sample.next)
            if not found and whole_epoch:
                raise DataError(f"the shards of stream {stream} ({', '.join(shards[:3])}...) hold no samples to "
                                "train on (empty, or all held out for validation)")
            epoch, first = epoch + 1, 0
            position = self._start_of(self.shards_of(stream, epoch)[0])

    def samples(self, stream: int, cursor: StreamCursor) -> Iterator[Tuple[StreamSample, StreamCursor]]:
        """Block-shuffled samples, each with the stream's cursor after it."""
        size = max(1, self.cfg.shuffle_buffer)
        sequence = self.sequence(stream, cursor)
        while True:
            block = list(itertools.islice(sequence, size))
            order = np.random.default_rng(derive_seed(self.seed, _BLOCK, stream, cursor.block)).permutation(len(block))
            epoch, shard, after = block[-1][1]
            following = StreamCursor(epoch, shard, after.offset, after.index, cursor.block + 1, 0)
            for i in range(cursor.emitted, len(block)):
                yield block[order[i]][0], (replace(cursor, emitted=i + 1) if i + 1 < len(block) else following)
            cursor = following

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != self.workers:
            raise DataError(f"StreamBatches expects {self.workers} loader workers, got "
                            f"{1 if info is None else info.num_workers}")
        local = (self.start_batch + worker) % self.workers
        stream = self.rank * self.workers + local
        samples = self.samples(stream, self.cursors[local])
        batch_index, epochs_without_image, last_epoch = self.start_batch + worker, 0, None
        while True:
            items, failures = [], []
            while len(items) < self.batch_size:
                sample, cursor = next(samples)
                if cursor.epoch != last_epoch:
                    epochs_without_image += last_epoch is not None
                    last_epoch = cursor.epoch
                position = (batch_index * self.num_processes + self.rank) * self.batch_size + len(items)
                item = self._item(sample, derive_seed(self.seed, _SAMPLE, position))
                if "failure" in item:
                    failures.append(item["failure"])
                    if epochs_without_image > 1:  # a whole epoch of this stream went by without one image
                        raise DataError(f"none of the samples in the shards of stream {stream} can be decoded "
                                        f"(e.g. {item['failure'].key}: {item['failure'].reason})")
                    continue
                epochs_without_image = 0
                items.append(item)
            batch = collate(items)
            batch["failures"] = failures
            batch["stream"] = {"index": local, "cursor": asdict(cursor)}
            yield batch
            batch_index += self.workers

    def _item(self, sample: StreamSample, seed: int) -> Dict[str, Any]:
        image, failure = decode(sample)
        if failure is not None:
            return {"failure": failure}
        try:
            crop = crop_image(image, self.cfg.resolution, self.cfg.resize, self.cfg.crop, self.cfg.hflip,
                              random.Random(seed))
        except ImageReadError as err:
            return {"failure": Failure(sample.id, str(err))}
        return {"pixel_values": to_tensor(crop), "seed": seed, "failures": []}


class StreamLoader:
    """A DataLoader over ``StreamBatches`` that remembers, per stream, the cursor after the last batch it
    handed out; ``state_dict()`` is this process's position in the data, saved with each checkpoint."""

    def __init__(self, batches: StreamBatches, **loader_kwargs):
        self.batches = batches
        self.cursors = dict(batches.cursors)
        self.loader = torch.utils.data.DataLoader(batches, batch_size=None, **loader_kwargs)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        # The DataLoader's iterator is made now, not at the first batch: it draws its workers' base seed
        # from the global RNG, which must happen where the map-style loader draws it.
        return self._track(iter(self.loader))

    def _track(self, batches) -> Iterator[Dict[str, Any]]:
        for batch in batches:
            stream = batch.pop("stream")
            self.cursors[stream["index"]] = StreamCursor(**stream["cursor"])
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return self.batches.state_dict(self.cursors)


# --------------------------------------------------------------------------- choosing the training data


def training_data(cfg: DataConfig):
    """``(train dataset, validation source or None, inputs already known to be unusable)`` for the data
    config: a ``TrainDataset`` over a map-style source, or a ``StreamTrainDataset`` over shards."""
    if not cfg.is_stream:
        train, val, failures = split_train_val(cfg)
        return TrainDataset(train, cfg), val, failures
    source = open_stream(cfg.shards, cfg.path if cfg.streaming else None, cfg.image_column, cfg.split,
                         cfg.key_column)
    next(source.read(source.shards[0]), None)  # a wrong image column is a DataError here, not in a loader worker
    if not source.exact_resume:
        logger.warning("%s is a remote streaming dataset: a resumed run sees exactly the samples an uninterrupted "
                       "one would only while the dataset's files do not change (pin a revision)", source.name)
    if cfg.val_path:
        val, failures = open_source(cfg.val_path, cfg.image_column, cfg.val_split or cfg.split, cfg.verify)
        return StreamTrainDataset(source, cfg), val, failures
    if cfg.val_split:
        val_stream = open_stream(None, cfg.path, cfg.image_column, cfg.val_split, cfg.key_column)
        samples, failures, _ = take_images(val_stream, cfg.val_images)
        return StreamTrainDataset(source, cfg), StreamImages(samples, f"{cfg.path} ({cfg.val_split})"), failures
    if cfg.val_images == 0:
        return StreamTrainDataset(source, cfg), None, []
    # Hold out the first readable samples of the first shards; training starts those shards after them.
    samples, failures, reached = take_images(source, cfg.val_images)
    if len(samples) < cfg.val_images:
        raise DataError(f"{source.name} has only {len(samples)} readable samples; holding out data.val_images="
                        f"{cfg.val_images} leaves none to train on. Lower data.val_images or set data.val_path.")
    return StreamTrainDataset(source, cfg, reached), StreamImages(samples, f"{source.name} (held out)"), failures
