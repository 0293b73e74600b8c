"""Sharded image streams: webdataset tar shards, parquet shards and 🤗 ``datasets`` in streaming mode.

What ``train`` and ``encode`` read when a dataset is too large to scan up front (10⁷–10⁹ images).
The unit of work is one *shard*: a tar or parquet file (local path or fsspec URL such as ``s3://``,
``https://`` or ``hf://``) or one shard of a streaming 🤗 dataset. A shard is read front to back,
one ``StreamSample`` at a time, so memory does not grow with the shard or the dataset.

Every sample has a stable id, ``<shard>#<key>``, and a position (``ShardPosition``) that a reader
can restart from: the next sample comes out exactly as it would have without the restart.
Samples that cannot be used (a member missing its image, a truncated JPEG, a non-image, a shard
cut short) are yielded too, with ``failure`` set, so every caller counts and reports them; none is
dropped silently. Decoding is ``data.images.load_image``, the one decoder of the project.

Tar shards follow the webdataset convention: consecutive members sharing a key (the member path up
to the first dot of its file name) form one sample; the image is the member with the first image
extension present, in the order of ``TAR_IMAGE_EXTENSIONS`` (``png``, ``jpg``, ``jpeg``, ``webp``, ``tif``,
``tiff``, ``bmp``), or the one named by ``image_key``. They are read with the
standard library's ``tarfile``, not the ``webdataset`` package: the reader needs the byte offset of
every sample (an exact, O(1) restart by ``seek``) and must yield bad samples instead of handing them
to an exception handler, and both are a few lines over ``tarfile`` but not part of webdataset's API;
it also saves a dependency. Compressed tars (``.tar.gz``, ``.tgz``) cannot seek: they restart by
reading past the samples already seen.

Use: ``source = open_stream(shards=..., path=..., image_column=...)`` (``data.shards`` or a streaming
``data.path``); ``split_shards(source.shards, i, n)`` for a rank's or a job's part; then, per shard,
``for sample in source.read(shard, position)`` and ``image, failure = decode(sample)``; a sample's
``next`` is the position to resume from after it.

Parquet shards hold one row per sample, the image as bytes in ``image_column`` (a binary column, or
the ``{"bytes", "path"}`` struct that 🤗 datasets writes); they are read one row group at a time, in
small record batches.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from PIL import Image

from ..errors import DataError, ImageReadError
from .images import load_image
from .sources import IMAGE_EXTENSIONS, Failure

TAR_SUFFIXES = (".tar",)
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
SHARD_SUFFIXES = TAR_SUFFIXES + COMPRESSED_TAR_SUFFIXES + PARQUET_SUFFIXES

# Tar members holding the image, in order of preference (webdataset extensions, lower case).
TAR_IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)

# A tar member larger than this is refused unread (a bounded allocation per sample); a real image
# file is far smaller, and load_image's pixel-count guard then bounds the decoded size.
MAX_MEMBER_BYTES = 512 * 2**20

# A brace range longer than this is a typo (no dataset has a billion shards), refused before allocating.
MAX_SHARDS = 10_000_000

# Rows decoded from parquet at a time: the memory of a shard read is this many rows, not a row group.
PARQUET_BATCH_ROWS = 64


@dataclass(frozen=True)
class ShardPosition:
    """Where reading a shard (re)starts: ``index`` samples already read; ``offset`` the byte offset of
    the next sample's first tar header (tar), or the row index (parquet, 🤗 datasets)."""

    offset: int = 0
    index: int = 0

    @property
    def finished(self) -> bool:
        """The shard has been read to its end (its last sample, or the point where it broke off)."""
        return self.offset == END


END = -1  # ShardPosition.offset of a shard read to its end


@dataclass
class StreamSample:
    """One sample of a shard, usable or not.

    ``index`` counts every sample of the shard from 0, bad ones included; ``image`` is the encoded
    image (``None`` when missing); ``fields`` the other members/columns (tar: extension -> bytes;
    parquet/datasets: column -> value), passed through unchanged; ``failure`` why the sample cannot
    be used before decoding (no image member, shard cut short...); ``next`` where reading resumes
    after this sample.
    """

    shard: str
    key: str
    index: int
    image: Optional[bytes]
    next: ShardPosition
    fields: Dict[str, Any] = field(default_factory=dict)
    failure: Optional[str] = None

    @property
    def id(self) -> str:
        """``<shard>#<key>``: how the sample is named in logs, failure lists and encoded rows."""
        return f"{self.shard}#{self.key}"


def decode(sample: StreamSample) -> Tuple[Optional[Image.Image], Optional[Failure]]:
    """The sample's image as 8-bit RGB (``load_image``), or the ``Failure`` saying why not."""
    if sample.failure is not None or sample.image is None:
        return None, Failure(sample.id, sample.failure or "no image")
    try:
        return load_image(sample.image), None
    except ImageReadError as err:
        return None, Failure(sample.id, str(err))


# --------------------------------------------------------------------------- shard lists


def expand_braces(pattern: str) -> List[str]:
    """``data-{000000..000099}.tar`` -> 100 names (zero padding kept); ``{a,b}`` alternatives; several
    groups expand left to right. A name without braces is returned as it is."""
    group = re.search(r"\{([^{}]*)\}", pattern)
    if group is None:
        return [pattern]
    body = group.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        low, high = int(first), int(last)
        if high < low or high - low >= MAX_SHARDS:
            raise DataError(f"shard pattern {pattern}: range {{{body}}} must count up and hold at most "
                            f"{MAX_SHARDS:,} names")
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        items = [str(i).zfill(width) for i in range(low, high + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"shard pattern {pattern}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")
    head, tail = pattern[: group.start()], pattern[group.end():]
    return [name for item in items for name in expand_braces(head + item + tail)]


def is_url(name: str) -> bool:
    return "://" in name


def shard_format(shard: str) -> str:
    """``tar`` or ``parquet`` from the name (a URL's query string ignored); DataError otherwise."""
    name = shard.split("?", 1)[0].lower()
    if name.endswith(TAR_SUFFIXES + COMPRESSED_TAR_SUFFIXES):
        return "tar"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise DataError(f"shard {shard} is neither a tar ({', '.join(TAR_SUFFIXES + COMPRESSED_TAR_SUFFIXES)}) "
                    f"nor a parquet ({', '.join(PARQUET_SUFFIXES)}) file; rename it or list only shards")


def _local_names(name: str) -> List[str]:
    path = Path(name).expanduser()
    if any(char in name for char in "*?["):
        found = sorted(glob.glob(str(path)))
        if not found:
            raise DataError(f"no shard matches {name}")
        return found
    if path.is_dir():
        found = sorted(str(p) for p in path.iterdir() if p.name.lower().endswith(SHARD_SUFFIXES))
        if not found:
            raise DataError(f"folder {name} holds no shards ({', '.join(SHARD_SUFFIXES)} files)")
        return found
    return [str(path)]


def list_shards(spec: Union[str, Sequence[str]]) -> List[str]:
    """Every shard named by ``spec``, in order: brace patterns, local globs and folders (their shard
    files, sorted), paths and URLs, as one string or a list of them.

    Local shards are checked to exist up front (a missing one is a typo, better found before a long
    run); URLs are opened only when read. A shard listed twice would be read twice: refused.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise DataError("no shards given: set data.shards to a pattern like /data/train-{000000..000099}.tar")
    shards: List[str] = []
    for pattern in patterns:
        for name in expand_braces(str(pattern)):
            shards.extend([name] if is_url(name) else _local_names(name))
    missing = [s for s in shards if not is_url(s) and not os.path.isfile(s)]
    if missing:
        raise DataError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}")
    seen = set()
    for shard in shards:
        shard_format(shard)
        if shard in seen:
            raise DataError(f"shard {shard} is listed twice; each shard must appear once")
        seen.add(shard)
    return shards


def split_shards(shards: Sequence[str], index: int, count: int) -> List[str]:
    """Part ``index`` of ``count`` (``shards[index::count]``): a process's share by global rank and world
    size, or a job's ``--shard-slice i/N``. Deterministic, and every shard is in exactly one part."""
    if count < 1 or not 0 <= index < count:
        raise DataError(f"shard part {index}/{count} does not exist (parts are 0..{count - 1} of {count})")
    return list(shards[index::count])


def _open_binary(shard: str):
    """A binary file object: local files directly, URLs through fsspec (``hf://`` via huggingface_hub)."""
    if not is_url(shard):
        return open(shard, "rb")
    import fsspec

    return fsspec.open(shard, "rb").open()


# --------------------------------------------------------------------------- tar shards


def _split_member_name(name: str) -> Tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the file name, extension = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _tar_sample(shard: str, key: str, index: int, members: Dict[str, bytes], next_position: ShardPosition,
                image_key: Optional[str]) -> StreamSample:
    wanted = (image_key,) if image_key else TAR_IMAGE_EXTENSIONS
    found = next((ext for ext in wanted if ext in members), None)
    if found is None:
        have = ", ".join(sorted(members)) or "nothing"
        return StreamSample(shard, key, index, None, next_position, members,
                            failure=f"no image member ({' or '.join(wanted)}) in the sample (it has: {have})")
    fields = {ext: data for ext, data in members.items() if ext != found}
    return StreamSample(shard, key, index, members[found], next_position, fields)


def read_tar_shard(shard: str, start: ShardPosition = ShardPosition(),
                   image_key: Optional[str] = None) -> Iterator[StreamSample]:
    """The samples of a webdataset tar shard from ``start`` on (see the module docstring).

    ``image_key``: the extension holding the image (default: the first image extension present).
    A shard that cannot be opened or is cut short ends with one failed sample naming where.
    """
    if start.finished:
        return
    compressed = shard.split("?", 1)[0].lower().endswith(COMPRESSED_TAR_SUFFIXES)
    # A compressed tar cannot seek: it is read from its start, samples before ``start`` unread but counted.
    index, skip = (0, start.index) if compressed else (start.index, 0)
    key, members = None, {}
    try:
        with _open_binary(shard) as handle:
            if not compressed:
                handle.seek(start.offset)  # tarfile then reports absolute member offsets
            tar = tarfile.open(fileobj=handle, mode="r|*" if compressed else "r:")  # noqa: SIM115 (closed with handle)
            while True:
                member = tar.next()
                tar.members.clear()  # tarfile keeps every header it has read: memory would grow with the shard
                if member is None:
                    break
                if not member.isfile():
                    continue
                member_key, extension = _split_member_name(member.name)
                if key is not None and member_key != key:
                    if index >= skip:
                        yield _tar_sample(shard, key, index, members, ShardPosition(member.offset, index + 1),
                                          image_key)
                    index, members = index + 1, {}
                key = member_key
                if member.size > MAX_MEMBER_BYTES:
                    members[extension] = b""  # unread; the sample fails below if this was its image
                    continue
                members[extension] = tar.extractfile(member).read() if index >= skip else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        yield StreamSample(shard, key if key is not None else f"@{index}", index, None,
                           ShardPosition(END, index + 1), members,
                           failure=f"shard unreadable after {index} samples ({type(err).__name__}: {err})")
        return
    if key is not None and index >= skip:
        yield _tar_sample(shard, key, index, members, ShardPosition(END, index + 1), image_key)


# --------------------------------------------------------------------------- parquet shards and dataset rows


def _row_sample(shard: str, row: Dict[str, Any], index: int, image_column: str, key_column: Optional[str],
                next_position: ShardPosition) -> StreamSample:
    """A parquet or 🤗 dataset row as a sample: the key from ``key_column`` (else ``__key__``, else the row
    number), the image from ``image_column`` (bytes or a ``{"bytes", "path"}`` cell)."""
    key_value = row.get(key_column or "__key__")
    key = str(index) if key_value is None else str(key_value)
    cell = row.get(image_column)
    fields = {name: value for name, value in row.items() if name != image_column}
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if cell is None:
        return StreamSample(shard, key, index, None, next_position, fields,
                            failure=f"no image bytes in column '{image_column}'")
    if not isinstance(cell, (bytes, bytearray)):
        return StreamSample(shard, key, index, None, next_position, fields,
                            failure=f"column '{image_column}' holds {type(cell).__name__}, not image bytes")
    return StreamSample(shard, key, index, bytes(cell), next_position, fields)


def read_parquet_shard(shard: str, start: ShardPosition = ShardPosition(), image_column: str = "image",
                       key_column: Optional[str] = None) -> Iterator[StreamSample]:
    """The rows of a parquet shard from row ``start.index`` on, one row group and ``PARQUET_BATCH_ROWS``
    rows at a time. A shard without ``image_column`` is a configuration error (DataError); a shard
    that cannot be opened or read ends with one failed sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if start.finished:
        return
    index = start.index
    try:
        with _open_binary(shard) as handle:
            parquet = pq.ParquetFile(handle)
            columns = parquet.schema_arrow.names
            if image_column not in columns:
                raise DataError(f"parquet shard {shard} has no column '{image_column}' (columns: "
                                f"{', '.join(columns)}); set data.image_column")
            first_row = 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if first_row + rows <= start.index:  # resume: whole row groups skipped unread
                    first_row += rows
                    continue
                row = first_row
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
                    for record in batch.to_pylist():
                        if row >= start.index:
                            yield _row_sample(shard, record, row, image_column, key_column,
                                              ShardPosition(END if row + 1 == parquet.metadata.num_rows else row + 1,
                                                          row + 1))
                            index = row + 1
                        row += 1
                first_row += rows
    except (pa.ArrowException, OSError) as err:
        yield StreamSample(shard, f"@{index}", index, None, ShardPosition(END, index + 1),
                           failure=f"shard unreadable after {index} rows ({type(err).__name__}: {err})")


# --------------------------------------------------------------------------- sources of shards


class StreamSource:
    """A sharded input: its shard ids and how to read one from a position.

    ``exact_resume``: whether reading a shard again from a ``ShardPosition`` gives exactly the samples
    that followed it the first time (true for files; for a remote 🤗 dataset only while its revision
    does not change).
    """

    name: str = ""
    shards: List[str]
    exact_resume: bool = True

    def read(self, shard: str, start: ShardPosition = ShardPosition()) -> Iterator[StreamSample]:
        raise NotImplementedError


class ShardFiles(StreamSource):
    """Tar and parquet shard files (paths or URLs), read by their format."""

    def __init__(self, shards: Sequence[str], image_column: str = "image", key_column: Optional[str] = None,
                 image_key: Optional[str] = None, name: Optional[str] = None):
        self.shards = list(shards)
        self.image_column, self.key_column, self.image_key = image_column, key_column, image_key
        self.name = name or (self.shards[0] if len(self.shards) == 1 else f"{len(self.shards)} shards "
                             f"({self.shards[0]} ... {self.shards[-1]})")

    def read(self, shard: str, start: ShardPosition = ShardPosition()) -> Iterator[StreamSample]:
        if shard_format(shard) == "tar":
            return read_tar_shard(shard, start, self.image_key)
        return read_parquet_shard(shard, start, self.image_column, self.key_column)


class StreamingDatasetShards(StreamSource):
    """A 🤗 ``datasets`` dataset opened with ``streaming=True`` (a hub name or a local data folder),
    one shard id per shard of its files (``IterableDataset.shard``): nothing is downloaded up front.

    A restart re-reads the shard up to the position (``IterableDataset.skip``): exact, at the cost of
    reading what was skipped. A hub dataset gives the same rows again only at the same revision.
    """

    def __init__(self, path: str, image_column: str = "image", split: str = "train",
                 key_column: Optional[str] = None):
        import datasets

        try:
            dataset = datasets.load_dataset(path, split=split, streaming=True)
        except Exception as err:  # network, missing repo, unknown split ...
            raise DataError(f"'{path}' could not be opened as a streaming Hugging Face dataset "
                            f"({type(err).__name__}: {err})") from None
        features = dataset.features or {}
        if features and image_column not in features:
            raise DataError(f"{path} has no column '{image_column}' (columns: {', '.join(features)}); "
                            "set data.image_column")
        if isinstance(features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column, self.key_column, self.name = dataset, image_column, key_column, path
        self.shards = [f"{path}@shard{i:05d}" for i in range(dataset.num_shards)]
        self.shard_index = {shard: i for i, shard in enumerate(self.shards)}
        self.exact_resume = Path(path).expanduser().is_dir()

    def read(self, shard: str, start: ShardPosition = ShardPosition()) -> Iterator[StreamSample]:
        if start.finished:
            return
        part = self.dataset.shard(num_shards=len(self.shards), index=self.shard_index[shard], contiguous=True)
        if start.index:
            part = part.skip(start.index)
        for index, row in enumerate(part, start=start.index):
            yield _row_sample(shard, row, index, self.image_column, self.key_column,
                              ShardPosition(index + 1, index + 1))


def open_stream(shards: Union[None, str, Sequence[str]] = None, path: Optional[str] = None,
                image_column: str = "image", split: str = "train", key_column: Optional[str] = None,
                image_key: Optional[str] = None) -> StreamSource:
    """The sharded input named by ``shards`` (``data.shards``: patterns, paths, URLs) or else by ``path``
    read as a streaming 🤗 dataset (``data.path`` with ``data.streaming=true``)."""
    if shards:
        return ShardFiles(list_shards(shards), image_column, key_column, image_key)
    if path:
        return StreamingDatasetShards(path, image_column, split, key_column)
    raise DataError("no sharded input: set data.shards (tar/parquet shards) or data.path with data.streaming=true")
