"""The file formats of an encode's shards: an Arrow stream (merged into a ``save_to_disk`` folder),
a parquet file, or a webdataset tar, each written from the same Arrow table of rows.

A webdataset sample is ``<key>.<column>.npy`` for every array column (``latent``, ``model_input``,
``logvar``, ``tokens``: ``numpy.save`` of the stored array, shape (C, h, w) or (h, w)) and
``<key>.json`` with the other columns; the key is the input's index, zero-padded, because a
webdataset key ends at the first dot and ids (file names) have dots.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, Iterator

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:  # imported where used: `import latent_vae` stays light
    import pyarrow

OUTPUT_FORMATS = ("datasets", "parquet", "webdataset")
ARRAY_COLUMNS = ("latent", "logvar", "model_input", "tokens")
SUFFIXES = {"datasets": "arrow", "parquet": "parquet", "webdataset": "tar"}


def flat_values(column: "pyarrow.ChunkedArray") -> np.ndarray:
    """Every value of a latent column (``Array3D`` or nested lists), flattened in row order."""
    import pyarrow as pa

    array = column.combine_chunks()
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    return array.flatten().flatten().flatten().to_numpy(zero_copy_only=False)


def write_table(handle: BinaryIO, table: "pyarrow.Table", output_format: str) -> None:
    """One shard's rows, in ``output_format``, to an open binary file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if output_format == "datasets":
        with pa.ipc.new_stream(handle, table.schema) as writer:
            writer.write_table(table)
    elif output_format == "parquet":
        pq.write_table(table, handle)
    else:
        _write_tar(handle, table)


def sample_key(index: int) -> str:
    return f"{index:09d}"


def _row_arrays(table: "pyarrow.Table", name: str) -> Iterator[np.ndarray]:
    """Each row's array of column ``name``, in its stored dtype and shape."""
    values = flat_values(table.column(name))
    offset = 0
    for shape in table.column("latent_shape").to_pylist():
        shape = shape[1:] if name == "tokens" else shape
        size = int(np.prod(shape))
        yield values[offset:offset + size].reshape(shape)
        offset += size


def _write_tar(handle: BinaryIO, table: "pyarrow.Table") -> None:
    """A webdataset shard. Members carry no time, owner or mode of their own, so the same rows
    give the same bytes (and the same SHA-256) whichever process writes them."""
    arrays = {name: _row_arrays(table, name) for name in ARRAY_COLUMNS if name in table.column_names}
    records = table.drop_columns(list(arrays)).to_pylist()
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            key = sample_key(record["index"])
            members: Dict[str, bytes] = {}
            for name, rows in arrays.items():
                buffer = io.BytesIO()
                np.save(buffer, next(rows), allow_pickle=False)
                members[f"{key}.{name}.npy"] = buffer.getvalue()
            members[f"{key}.json"] = json.dumps(record, sort_keys=True).encode()
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))


def check_webdataset_columns(passthrough: Any) -> None:
    """A webdataset sample keeps the source's other columns in its JSON: refuse, before any work,
    a source whose columns JSON cannot hold (images, bytes)."""
    if passthrough is None or len(passthrough) == 0:
        return
    try:
        json.dumps(passthrough[0])
    except TypeError:
        names = ", ".join(passthrough.column_names)
        raise ConfigError(f"--format webdataset keeps the source's other columns ({names}) as JSON, and one of "
                          "them is not JSON (bytes or an image); use --format parquet or datasets") from None
