"""Tar and parquet shards written by the tests, with hostile members inside: a truncated JPEG, a
non-image, a sample missing its image. Each writer returns what a reader must find, so tests count
rows exactly instead of trusting the reader."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

# Where the hostile samples sit in every shard (sample index -> kind), when the shard is long enough.
HOSTILE = {1: "truncated", 3: "not-an-image", 5: "missing-image"}


@dataclass
class ShardSet:
    """Shards written by ``write_shards`` and what reading them must give."""

    shards: List[str]
    good: List[str] = field(default_factory=list)  # ids "<shard>#<key>" of decodable samples, in order
    bad: Dict[str, str] = field(default_factory=dict)  # id -> kind of hostile sample

    @property
    def total(self) -> int:
        return len(self.good) + len(self.bad)


def image_bytes(seed: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    """A small random photo-like image, encoded; the seed makes every sample distinct."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, 3))
    array = np.clip(base + rng.normal(0, 40, (size, size + 8, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _sample_members(seed: int, kind: str) -> Dict[str, bytes]:
    caption = f"sample {seed}".encode()
    if kind == "truncated":
        jpeg = image_bytes(seed)
        return {"jpg": jpeg[: len(jpeg) // 2], "txt": caption}
    if kind == "not-an-image":
        return {"png": b"this is plain text, not a PNG file", "txt": caption}
    if kind == "missing-image":
        return {"txt": caption, "json": b'{"width": 24}'}
    return {("png" if seed % 4 == 0 else "jpg"): image_bytes(seed, fmt="PNG" if seed % 4 == 0 else "JPEG"),
            "txt": caption}


def write_shards(folder: Path, shards: int = 3, per_shard: int = 8, fmt: str = "tar",
                 hostile: bool = True, prefix: str = "data", padding: int = 0) -> ShardSet:
    """``shards`` files ``<prefix>-000000.<fmt>``... of ``per_shard`` samples each (keys ``s<shard>-<i>``),
    tar (webdataset layout) or parquet (``image`` struct column like 🤗 datasets writes, ``key``,
    ``caption``; two row groups per shard so readers cross a row-group boundary). ``padding``: bytes of
    an extra ``bin`` member in every tar sample (large samples without the cost of decoding large images)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = ShardSet([])
    for shard_index in range(shards):
        path = folder / f"{prefix}-{shard_index:06d}.{fmt}"
        samples = []
        for i in range(per_shard):
            kind = HOSTILE.get(i, "good") if hostile else "good"
            key = f"s{shard_index:03d}-{i:04d}"
            members = _sample_members(shard_index * 1000 + i, kind)
            if padding:
                members["bin"] = bytes(padding)
            samples.append((key, members))
            sample_id = f"{path}#{key}"
            if kind == "good":
                result.good.append(sample_id)
            else:
                result.bad[sample_id] = kind
        if fmt == "tar":
            _write_tar(path, samples)
        else:
            _write_parquet(path, samples)
        result.shards.append(str(path))
    return result


def _write_tar(path: Path, samples) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_parquet(path: Path, samples) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def image_of(members):
        data = next((members[e] for e in ("jpg", "png") if e in members), None)
        return None if data is None else {"bytes": data, "path": None}

    table = pa.table({
        "key": [key for key, _ in samples],
        "image": [image_of(members) for _, members in samples],
        "caption": [members["txt"].decode() for _, members in samples],
    })
    pq.write_table(table, path, row_group_size=max(1, (len(samples) + 1) // 2))
