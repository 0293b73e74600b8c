"""How encoded rows are stored: the storage dtypes, the output columns, and the shards of a run.

Latents are fixed-shape arrays (``datasets.Array3D``, tokens ``Array2D``) in the storage dtype,
float32 or float16, so ``with_format("torch")`` gives float tensors of the right shape; with
aspect-ratio buckets, where the shape changes from row to row, nested lists (``C, h, w``).
``latent_to_tensor`` turns any stored value back into a tensor, exactly.

A shard's data file (``shards/shard-000012.arrow``, or ``data/train-000012-of-000040.parquet``/
``.tar``, see ``formats``) is written to a temporary name and renamed, then its manifest
(``shards/shard-000012.json``: rows, their indices, failures and the data's SHA-256) is written
the same way; a shard counts as done only when its manifest parses and the data file matches the
recorded SHA-256 (``ShardStore.verify``), so a file truncated or garbled after it was written is
redone, never merged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..data.sources import ImageSource
from ..runtime import atomic_write_bytes, atomic_write_json, file_digest
from .formats import ARRAY_COLUMNS, SUFFIXES, write_table
from .options import EncodeOptions

if TYPE_CHECKING:  # imported where used: `import latent_vae` stays light
    import datasets
    import pyarrow

VALUE_TYPES = {"fp32": "float32", "fp16": "float16"}
# The per-row preprocessing record under the names a layout gives it: diffusers' SDXL training
# script reads `original_sizes` and `crop_top_lefts` (plural) per row.
RECORD_COLUMNS = {
    "default": {"original_size": "original_size", "crop_top_left": "crop_top_left"},
    "diffusers": {"original_size": "original_sizes", "crop_top_left": "crop_top_lefts"},
}
RECORD_KEYS = ("original_size", "resized_size", "crop_top_left", "target_size", "upscaled")


def to_storage(latents: torch.Tensor, dtype: str) -> np.ndarray:
    """fp32 latents -> the stored array: float32 or float16."""
    return latents.half().numpy() if dtype == "fp16" else latents.float().numpy()


def latent_to_tensor(value: Any, dtype: str) -> torch.Tensor:
    """A stored latent (nested lists, numpy array or tensor, any ``datasets`` format) -> a tensor
    of exactly the stored values: float32 or float16 for ``dtype`` fp32/fp16."""
    array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
    return torch.from_numpy(array.astype(np.float16 if dtype == "fp16" else np.float32))


def _nested_lists(array: np.ndarray) -> "pyarrow.Array":
    """(N, d1, ..., dk) numpy array -> Arrow list<list<...>> of N rows, without Python loops."""
    import pyarrow as pa

    nested = pa.array(np.ascontiguousarray(array).reshape(-1))
    count = array.size
    for size in reversed(array.shape[1:]):
        nested = pa.ListArray.from_arrays(pa.array(np.arange(0, count + 1, size, dtype=np.int32)), nested)
        count //= size
    return nested


def _as_type(array: "pyarrow.Array", arrow_type: "pyarrow.DataType") -> "pyarrow.Array":
    """``array`` as a column of ``arrow_type``, extension types (``Array3D``) included."""
    import pyarrow as pa

    if array.type == arrow_type:
        return array
    if isinstance(arrow_type, pa.ExtensionType):
        return arrow_type.wrap_array(array.cast(arrow_type.storage_type))
    return array.cast(arrow_type)


def output_features(options: EncodeOptions, vq: bool, passthrough,
                    latent_shape: Optional[Tuple[int, int, int]]) -> Tuple["datasets.Features", Dict[str, str]]:
    """The output columns, and the output name of each source column passed through: its own,
    or ``source_<name>`` where it would collide with one of ours. ``latent_shape`` (C, h, w) is
    the shape of every row's latent, or None when it changes from row to row (buckets). Rows of
    sharded inputs (``options.shards``/``streaming``) add ``shard`` (its position in the shard
    list; ``index`` counts within the shard) and ``fields`` (the sample's other members, JSON)."""
    from datasets import Array2D, Array3D, Features, List, Value

    value = VALUE_TYPES[options.dtype]
    if latent_shape is None:
        latent, tokens = List(List(List(Value(value)))), List(List(Value("int32")))
    else:
        latent, tokens = Array3D(latent_shape, value), Array2D(latent_shape[1:], "int32")
    pair = List(Value("int32"))
    columns: Dict[str, Any] = {"id": Value("string"), "index": Value("int64")}
    if options.sharded:
        columns.update({"shard": Value("int32"), "fields": Value("string")})
    columns["latent"] = latent
    if options.layout == "diffusers":
        columns["model_input"] = latent
    if options.latent == "mean_logvar":
        columns["logvar"] = latent
    if options.latent == "sample":
        columns["sample_seed"] = Value("int64")
    if vq:
        columns["tokens"] = tokens
    names = RECORD_COLUMNS[options.layout]
    columns.update({"latent_shape": List(Value("int32")), names["original_size"]: pair, "resized_size": pair,
                    names["crop_top_left"]: pair, "target_size": pair, "upscaled": Value("bool")})
    renamed: Dict[str, str] = {}
    for name, feature in passthrough.items():
        output_name = name
        while output_name in columns:
            output_name = f"source_{output_name}"
        renamed[name], columns[output_name] = output_name, feature
    return Features(columns), renamed


def passthrough_dataset(source: ImageSource):
    """The source's other columns (captions, labels...) as a ``datasets.Dataset``, or None for folders."""
    dataset = getattr(source, "dataset", None)
    if dataset is None:
        return None
    return dataset.remove_columns([source.image_column])


class ShardStore:
    """Shard files of one output directory: the data file (``shards/shard-000012.arrow``, merged at
    the end; or, final as written, ``data/train-000012-of-000040.parquet`` / ``.tar``) and its
    manifest ``shards/shard-000012.json`` (rows, their indices, failures, the data's SHA-256)."""

    def __init__(self, output_dir: Path, shard_size: int, num_items: int, output_format: str = "datasets"):
        self.output_dir, self.root = output_dir, output_dir / "shards"
        self.shard_size, self.num_items, self.output_format = shard_size, num_items, output_format
        self.num_shards = max(1, math.ceil(num_items / shard_size))

    def indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.num_items, (shard + 1) * self.shard_size))

    def data_path(self, shard: int) -> Path:
        if self.output_format == "datasets":
            return self.root / f"shard-{shard:06d}.arrow"
        return self.output_dir / "data" / f"train-{shard:06d}-of-{self.num_shards:06d}.{SUFFIXES[self.output_format]}"

    def manifest_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:06d}.json"

    def manifest(self, shard: int) -> Dict[str, Any]:
        return json.loads(self.manifest_path(shard).read_text())

    def verify(self, shard: int) -> Optional[str]:
        """Why ``shard`` is not done, or None: no manifest, a manifest that does not parse or lacks
        the data file's SHA-256, or a data file that is missing or differs from it (truncated,
        garbled, overwritten)."""
        if not self.manifest_path(shard).is_file():
            return "not written"
        try:
            manifest = self.manifest(shard)
            expected = manifest["sha256"]
            if not all(isinstance(manifest[key], list) for key in ("indices", "failures")):
                raise TypeError("indices or failures is not a list")
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"its manifest {self.manifest_path(shard).name} is unreadable ({type(err).__name__})"
        path = self.data_path(shard)
        try:
            actual = file_digest(path)
        except OSError as err:
            return f"{path.name} is unreadable ({err.strerror})"
        if actual != expected:
            return f"{path.name} does not match the SHA-256 in its manifest (truncated or corrupted on disk)"
        return None

    def write(self, shard: int, table, failures: List[Dict[str, Any]]) -> None:
        """The data file (even with no rows, so that every shard of the sequence exists), then the
        manifest that makes the shard count as done."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.data_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = file_digest(atomic_write_bytes(path, lambda handle: write_table(handle, table, self.output_format)))
        atomic_write_json(self.manifest_path(shard), {
            "shard": shard, "rows": table.num_rows, "indices": table.column("index").to_pylist(),
            "failures": failures, "sha256": digest,
        })


class ShardAssembler:
    """Collects the encoded rows of the shards in flight and writes each one when complete.

    Rows are addressed by a key: here the input's index in the source, whose shard is
    ``key // shard_size``. ``streaming.StreamAssembler`` addresses rows of sharded inputs instead.
    """

    def __init__(self, store: ShardStore, source: Optional[ImageSource], options: EncodeOptions, features,
                 passthrough: Dict[str, str]):
        self.store, self.source, self.options, self.features = store, source, options, features
        self.passthrough = passthrough
        self.pending: Dict[int, Dict[str, Any]] = {}

    # ---- how rows are addressed (overridden for sharded inputs)
    def shard_of(self, key: int) -> int:
        return key // self.store.shard_size

    def expected_rows(self, shard: int) -> Optional[int]:
        """Inputs in ``shard`` (rows + failures), or None while not known yet."""
        return len(self.store.indices(shard))

    def row_index(self, key: int) -> int:
        return key

    def row_id(self, key: int) -> str:
        return self.source.key(key)

    def other_columns(self, keys: List[int]) -> Dict[str, Any]:
        """The source's other columns for these rows, as Arrow arrays: passed through unchanged."""
        if not self.passthrough:
            return {}
        table = passthrough_dataset(self.source).select(keys).with_format("arrow")[:]
        return {new: table.column(name).combine_chunks() for name, new in self.passthrough.items()}

    # ---- collecting
    def _shard(self, shard: int) -> Dict[str, Any]:
        return self.pending.setdefault(shard, {"seen": 0, "parts": [], "failures": []})

    def add_rows(self, keys: List[int], records: List[Dict[str, Any]], encoded: Dict[str, torch.Tensor],
                 seeds: Optional[List[int]]) -> None:
        rows = {name: to_storage(value, self.options.dtype) for name, value in encoded.items() if name != "tokens"}
        keep = list(range(len(keys)))
        if self.options.dtype == "fp16":  # beyond ±65504: listed as failures, never stored as inf
            finite = np.array([np.isfinite(v.reshape(len(keys), -1)).all(axis=1) for v in rows.values()]).all(axis=0)
            for i in np.flatnonzero(~finite):
                self._fail(keys[i], "latent exceeds the fp16 range; encode with --dtype fp32")
            keep = np.flatnonzero(finite).tolist()
        if not keep:
            return
        by_shard: Dict[int, List[int]] = {}
        for position in keep:
            by_shard.setdefault(self.shard_of(keys[position]), []).append(position)
        for shard, positions in by_shard.items():
            part = {name: array[positions] for name, array in rows.items()}
            if "tokens" in encoded:
                part["tokens"] = encoded["tokens"][positions].numpy().astype(np.int32)
            part["keys"] = [keys[p] for p in positions]
            part["records"] = [records[p] for p in positions]
            part["seeds"] = [seeds[p] for p in positions] if seeds is not None else None
            entry = self._shard(shard)
            entry["parts"].append(part)
            entry["seen"] += len(positions)
            self._flush_if_complete(shard)

    def _fail(self, key: int, reason: str) -> None:
        shard = self.shard_of(key)
        entry = self._shard(shard)
        entry["failures"].append({"index": self.row_index(key), "id": self.row_id(key), "reason": reason})
        entry["seen"] += 1
        self._flush_if_complete(shard)

    def add_failures(self, failures: List[Tuple[int, str]]) -> None:
        for key, reason in failures:
            self._fail(key, reason)

    def _flush_if_complete(self, shard: int) -> None:
        entry = self.pending[shard]
        if entry["seen"] == self.expected_rows(shard):
            del self.pending[shard]
            failures = sorted(entry["failures"], key=lambda f: f["index"])
            self.store.write(shard, self._table(entry["parts"]), failures)

    def _table(self, parts: List[Dict[str, Any]]):
        import pyarrow as pa

        schema = self.features.arrow_schema
        if not parts:
            return schema.empty_table()
        keys = [k for part in parts for k in part["keys"]]
        records = [r for part in parts for r in part["records"]]
        columns: Dict[str, Any] = {
            "id": pa.array([self.row_id(k) for k in keys], pa.string()),
            "index": pa.array([self.row_index(k) for k in keys], pa.int64()),
            "latent_shape": pa.array([list(part["latent"].shape[1:]) for part in parts
                                      for _ in part["keys"]], pa.list_(pa.int32())),
        }
        for name in ARRAY_COLUMNS:
            if name in parts[0]:
                columns[name] = pa.concat_arrays([_nested_lists(part[name]) for part in parts])
        if "sample_seed" in schema.names:
            columns["sample_seed"] = pa.array([s for part in parts for s in part["seeds"]], pa.int64())
        names = RECORD_COLUMNS[self.options.layout]
        for key in RECORD_KEYS:
            columns[names.get(key, key)] = pa.array([r[key] for r in records])
        columns.update(self.other_columns(keys))
        table = pa.Table.from_arrays([_as_type(columns[name], schema.field(name).type) for name in schema.names],
                                     schema=schema)
        return table.take(pa.array(np.argsort(keys, kind="stable")))
