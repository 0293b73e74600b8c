"""Encoding sharded inputs (webdataset tar shards, parquet shards, a streaming 🤗 dataset): the
reading side (``StreamInputs``) and the rows of one input shard becoming one output shard
(``StreamAssembler``). The readers are ``data.streams``; ``run.encode_dataset`` drives the job.

Input shard ``j`` of the shard list becomes output shard ``j``, whole: a shard is read front to
back by one DataLoader worker of one process, its samples counted (bad ones included, reported
as ``<shard>#<key>``), and its output is written once the end of the shard has been read.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..data.streams import StreamSample, StreamSource, decode
from .options import EncodeOptions
from .preprocess import Preprocessing, prepare
from .storage import ShardAssembler, ShardStore

# A row key packs (shard, sample index within the shard): every key is unique in the run, and
# keys sort by shard, then by position in the shard.
SHARD_BITS = 32


def row_key(shard: int, index: int) -> int:
    return (shard << SHARD_BITS) | index


def split_key(key: int) -> Tuple[int, int]:
    """(shard, index within the shard) of a row key."""
    return key >> SHARD_BITS, key & ((1 << SHARD_BITS) - 1)


def samples_per_shard(max_samples: Optional[int], num_shards: int, shard: int) -> Optional[int]:
    """``--max-samples N`` over S shards: shard j reads its first N // S samples, one more for the
    first N mod S shards. The same N samples whatever the number of processes, nodes or reruns
    (fewer when a shard is shorter than its share)."""
    if max_samples is None:
        return None
    return max_samples // num_shards + (1 if shard < max_samples % num_shards else 0)


def fields_json(sample: StreamSample) -> str:
    """A sample's other members or columns as JSON text: tar members as UTF-8 text where they are
    text (captions, JSON), else their size; parquet and 🤗 columns as their JSON value or text."""
    fields: Dict[str, Any] = {}
    for name, value in sample.fields.items():
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                value = f"<{len(value)} bytes>"
        fields[name] = value
    return json.dumps(fields, sort_keys=True, default=str)


class StreamInputs(torch.utils.data.IterableDataset):
    """The samples of ``shards`` ((number, shard id) pairs), preprocessed, then one end-of-shard
    marker per shard with its sample count. Each DataLoader worker reads whole shards
    (``shards[worker::workers]``), so the samples of one shard arrive in order."""

    def __init__(self, stream: StreamSource, shards: Sequence[Tuple[int, str]], preprocessing: Preprocessing,
                 max_samples: Optional[int], num_shards: int):
        self.stream, self.shards, self.preprocessing = stream, list(shards), preprocessing
        self.max_samples, self.num_shards = max_samples, num_shards

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        mine = self.shards if worker is None else self.shards[worker.id::worker.num_workers]
        for number, shard in mine:
            limit = samples_per_shard(self.max_samples, self.num_shards, number)
            count = 0
            for sample in self.stream.read(shard):
                if limit is not None and count >= limit:
                    break
                count += 1
                yield self._item(number, sample)
            yield {"shard": number, "end": count}

    def _item(self, number: int, sample: StreamSample) -> Dict[str, Any]:
        item = {"shard": number, "key": row_key(number, sample.index), "id": sample.id,
                "fields": fields_json(sample)}
        image, failure = decode(sample)
        if failure is not None:
            return {**item, "failure": failure.reason}
        return {**item, **prepare(self.preprocessing, image)}


class StreamAssembler(ShardAssembler):
    """Rows of sharded inputs: keyed by ``row_key(shard, index)``; a shard's row count is known
    when its end marker arrives (``end_shard``)."""

    def __init__(self, store: ShardStore, options: EncodeOptions, features):
        super().__init__(store, None, options, features, {})
        self.ids: Dict[int, str] = {}
        self.fields: Dict[int, str] = {}
        self.ends: Dict[int, int] = {}

    def shard_of(self, key: int) -> int:
        return split_key(key)[0]

    def expected_rows(self, shard: int) -> Optional[int]:
        return self.ends.get(shard)

    def row_index(self, key: int) -> int:
        return split_key(key)[1]

    def row_id(self, key: int) -> str:
        return self.ids[key]

    def other_columns(self, keys: List[int]) -> Dict[str, Any]:
        import pyarrow as pa

        return {"shard": pa.array([self.shard_of(k) for k in keys], pa.int32()),
                "fields": pa.array([self.fields.pop(k) for k in keys], pa.string())}

    def note(self, item: Dict[str, Any]) -> None:
        """Remember a sample's id and other fields until its shard is written."""
        self.ids[item["key"]], self.fields[item["key"]] = item["id"], item["fields"]

    def add_failures(self, failures: List[Tuple[int, str]]) -> None:
        super().add_failures(failures)
        for key, _ in failures:
            self.fields.pop(key, None)

    def end_shard(self, shard: int, count: int) -> None:
        """All ``count`` samples of ``shard`` have been handed over: write it once they are in."""
        self.ends[shard] = count
        self._shard(shard)
        self._flush_if_complete(shard)
        if shard not in self.pending:
            self.ids = {k: v for k, v in self.ids.items() if self.shard_of(k) != shard}
