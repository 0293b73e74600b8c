"""What ``encode_dataset`` can be told, and the checks that refuse a bad value before any work."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from ..errors import ConfigError, check_choice, check_positive
from ..runtime import PRECISIONS
from .formats import OUTPUT_FORMATS

LATENT_MODES = ("mean", "mean_logvar", "sample")
STORAGE_DTYPES = ("fp32", "fp16")
BUCKET_MODES = ("none", "sdxl")
# default: the raw latents; diffusers: also `model_input` (the scaled latents) and the
# per-row fields under the names diffusers' SDXL training script reads.
LAYOUTS = ("default", "diffusers")


@dataclass
class EncodeOptions:
    """Everything ``encode_dataset`` can be told. Fields above ``batch_size`` define the output
    (a resumed run must use the same values); the others only change the speed."""

    resolution: int = 256
    buckets: str = "none"
    patch_size: int = 2  # sides are multiples of patch_size × the VAE factor: patch-2 transformers accept them
    upscale: bool = True
    latent: str = "mean"
    seed: int = 0
    dtype: str = "fp32"
    layout: str = "default"
    output_format: str = "datasets"
    precision: str = "auto"
    tiled: bool = False
    tile_size: Optional[int] = None
    tile_overlap: float = 0.25
    image_column: str = "image"
    split: str = "train"
    subfolder: Optional[str] = None
    shard_size: int = 256
    # ---- sharded inputs: one input shard is one output shard
    shards: Optional[Sequence[str]] = None  # tar/parquet shards: brace patterns, globs, folders, paths, URLs
    streaming: bool = False  # `data` is a 🤗 dataset read with streaming=True
    key_column: Optional[str] = None
    image_key: Optional[str] = None
    max_samples: Optional[int] = None
    # ---- speed only
    batch_size: Optional[int] = None  # 16 on CUDA, 1 on CPU (larger CPU batches fall out of cache)
    num_workers: int = field(default_factory=lambda: min(4, max(0, (os.cpu_count() or 1) - 1)))
    prefetch_factor: int = 4
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    device: Optional[str] = None
    overwrite: bool = False
    keep_shards: bool = False
    shard_slice: Optional[str] = None  # "i/N": this job takes shards i, i+N, i+2N ... of the list
    push_to_hub: Optional[str] = None  # a dataset repository id: the finished set and its card are uploaded
    hub_private: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Named by their command-line flags: that is how a user sets them."""
        check_choice("--latent", self.latent, LATENT_MODES)
        if self.dtype == "bf16":
            raise ConfigError("--dtype bf16 is not offered: Arrow has no bfloat16, and bf16 stored as int16 bit "
                              "patterns loads as integers a training script would use as numbers; use --dtype fp16 "
                              "(the same 2 bytes, finer steps) or fp32")
        check_choice("--dtype", self.dtype, STORAGE_DTYPES)
        check_choice("--layout", self.layout, LAYOUTS)
        check_choice("--format", self.output_format, OUTPUT_FORMATS)
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--buckets", self.buckets, BUCKET_MODES)
        for name in ("resolution", "patch_size", "batch_size", "shard_size", "max_samples"):
            if getattr(self, name) is not None:
                check_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        if (self.shard_slice or self.max_samples) and not self.sharded:
            raise ConfigError("--shard-slice and --max-samples apply to sharded inputs: give --shards or --streaming")
        if self.shard_slice is not None:
            self.slice  # noqa: B018 (checks the value)
            if self.overwrite:
                raise ConfigError("--overwrite cannot be combined with --shard-slice: other slices may be writing the "
                                  "same --output-dir; delete it yourself before starting all slices")
        if not 0.0 < self.tile_overlap < 1.0:
            raise ConfigError(f"--tile-overlap must be between 0 and 1 (got {self.tile_overlap})")

    @property
    def sharded(self) -> bool:
        return bool(self.shards) or self.streaming

    @property
    def slice(self) -> Tuple[int, int]:
        """``--shard-slice i/N`` as (i, N); (0, 1) without one."""
        if self.shard_slice is None:
            return 0, 1
        try:
            index, count = (int(part) for part in str(self.shard_slice).split("/"))
        except ValueError:
            index, count = -1, 0
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"--shard-slice {self.shard_slice} is not i/N with 0 <= i < N, e.g. 0/4 ... 3/4")
        return index, count
