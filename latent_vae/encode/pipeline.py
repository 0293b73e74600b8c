"""Encoding image datasets to latents with a stock diffusers VAE, and decoding them back.

``encode_dataset`` reads images (a folder, a ``save_to_disk`` dataset, a hub dataset),
preprocesses them (resize + centre crop, or SDXL-style aspect-ratio buckets, recorded per row),
encodes them in batches and writes a ``datasets``-loadable directory::

    latents/
      data-*.arrow, dataset_info.json, state.json   datasets.load_from_disk("latents/")
      encode_config.json   what defines the output (model, data, preprocessing, storage)
      failures.jsonl       one line per unusable input: {"index", "id", "reason"}
      summary.json         counts (read = encoded + failed); written last: the run is complete
      shards/              per-shard files while the run is in progress

Resumable and loss-free: the inputs are cut into fixed shards of ``shard_size`` consecutive
indices; shard ``j`` belongs to process ``j mod P``. A shard is written to a temporary name
and renamed, then its manifest (row count and failures) is written the same way; a shard
counts as done only when its manifest exists. A killed run restarted with the same settings
(any number of processes) redoes only the shards without a manifest. The merge checks that
every input index appears exactly once, as a row or as a failure.

Rows hold the latent as nested lists ``(C, h, w)`` in the storage dtype: fp32, fp16, or bf16
stored as its raw bit pattern in int16 (Arrow has no bfloat16); ``latent_to_tensor`` turns
any stored value back into a tensor, exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..data.sources import Failure, ImageSource, open_source
from ..errors import ConfigError, DataError, ImageReadError
from ..models.loading import load_autoencoder
from ..models.stock import Autoencoder, downsample_factor, is_vq, latent_channels, latents_to_indices
from ..models.tiling import configure_tiling
from ..runtime import (
    PRECISIONS,
    _CompiledOrEager,
    atomic_write_bytes,
    atomic_write_json,
    resolve_precision,
    run_with_fp32_fallback,
)
from ..seeding import derive_seed

if TYPE_CHECKING:  # imported where used: `import latent_vae` stays light
    import datasets
    import pyarrow

logger = logging.getLogger("latent_vae")

FORMAT_VERSION = 1

# --------------------------------------------------------------------------- preprocessing

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
def bucket_sizes(resolution: int, factor: int) -> Tuple[Tuple[int, int], ...]:
    """SDXL's buckets scaled from 1024² to ``resolution``² pixels, each side rounded to a
    multiple of ``factor`` (the VAE's downsampling factor, so latents have integer sizes)."""
    sizes: List[Tuple[int, int]] = []
    for height, width in SDXL_BUCKETS:
        size = tuple(max(factor, round(side * resolution / 1024 / factor) * factor) for side in (height, width))
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
    factor: int = 8

    def target_size(self, width: int, height: int) -> Tuple[int, int]:
        """(height, width) of the crop for an image of the given size."""
        if self.buckets == "none":
            return self.resolution, self.resolution
        aspect = math.log(width / height)
        return min(bucket_sizes(self.resolution, self.factor), key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))

    def __call__(self, image: Image.Image) -> Tuple[Image.Image, Dict[str, Any]]:
        width, height = image.size
        target_h, target_w = self.target_size(width, height)
        scale = max(target_h / height, target_w / width)
        if scale > 1 and not self.upscale:
            raise SkippedInput(f"smaller than the {target_w}x{target_h} crop ({width}x{height}) and upscaling "
                               "is off (--no-upscale)")
        new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
        if (new_w, new_h) != (width, height):
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


# --------------------------------------------------------------------------- options

LATENT_MODES = ("mean", "mean_logvar", "sample")
STORAGE_DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class EncodeOptions:
    """Everything ``encode_dataset`` can be told. Fields above ``batch_size`` define the output
    (a resumed run must use the same values); the others only change the speed."""

    resolution: int = 256
    buckets: str = "none"
    upscale: bool = True
    latent: str = "mean"
    seed: int = 0
    dtype: str = "fp32"
    precision: str = "auto"
    tiled: bool = False
    tile_size: Optional[int] = None
    tile_overlap: float = 0.25
    image_column: str = "image"
    split: str = "train"
    subfolder: Optional[str] = None
    shard_size: int = 256
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
    progress: bool = True

    def validate(self) -> None:
        _check_choice("latent", self.latent, LATENT_MODES)
        _check_choice("dtype", self.dtype, STORAGE_DTYPES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("buckets", self.buckets, ("none", "sdxl"))
        for name in ("resolution", "batch_size", "shard_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not 0.0 < self.tile_overlap < 1.0:
            raise ConfigError(f"--tile-overlap must be between 0 and 1 (got {self.tile_overlap})")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)} (got '{value}')")


# --------------------------------------------------------------------------- storage


def to_storage(latents: torch.Tensor, dtype: str) -> np.ndarray:
    """fp32 latents -> the stored array: float32, float16, or bf16's bit pattern as int16."""
    if dtype == "fp32":
        return latents.float().numpy()
    if dtype == "fp16":
        return latents.half().numpy()
    return latents.bfloat16().view(torch.int16).numpy()


def latent_to_tensor(value: Any, dtype: str) -> torch.Tensor:
    """A stored latent (nested lists, numpy array or tensor, any ``datasets`` format) -> a tensor
    of exactly the stored values: float32, float16 or bfloat16 for ``dtype`` fp32/fp16/bf16."""
    array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
    if dtype == "bf16":
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16)
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


def _value_type(dtype: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "bf16": "int16"}[dtype]


def _features(options: EncodeOptions, vq: bool, passthrough) -> Tuple["datasets.Features", Dict[str, str]]:
    """The output columns, and the output name of each source column passed through: its own,
    or ``source_<name>`` where it would collide with one of ours."""
    from datasets import Features, List, Value

    latent = List(List(List(Value(_value_type(options.dtype)))))
    pair = List(Value("int32"))
    columns: Dict[str, Any] = {"id": Value("string"), "index": Value("int64"), "latent": latent}
    if options.latent == "mean_logvar":
        columns["logvar"] = latent
    if options.latent == "sample":
        columns["sample_seed"] = Value("int64")
    if vq:
        columns["tokens"] = List(List(Value("int32")))
    columns.update({"latent_shape": List(Value("int32")), "original_size": pair, "resized_size": pair,
                    "crop_top_left": pair, "target_size": pair, "upscaled": Value("bool")})
    renamed: Dict[str, str] = {}
    for name, feature in passthrough.items():
        output_name = name
        while output_name in columns:
            output_name = f"source_{output_name}"
        renamed[name], columns[output_name] = output_name, feature
    return Features(columns), renamed


# --------------------------------------------------------------------------- the encoder


class LatentEncoder:
    """Images -> latents exactly as stock diffusers computes them, through the fast paths.

    Returns fp32 CPU tensors: ``latent`` (posterior mean, or a posterior sample for
    ``latent="sample"``; for VQ the pre-quantisation latent ``VQModel.encode(x).latents``),
    ``logvar`` (``mean_logvar``), ``tokens`` (VQ: ``tokens.latents_to_indices`` of the same latents).

    Under fp16 autocast a batch whose output is not finite is recomputed in fp32 (counted in
    ``fp32_retries``): some VAEs overflow fp16 (the reason sdxl-vae-fp16-fix exists).
    """

    def __init__(self, model: Autoencoder, latent: str = "mean", precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False, compile_backend: str = "inductor"):
        self.model, self.latent, self.precision = model.eval().requires_grad_(False), latent, precision
        self.vq, self.channels_last, self.fp32_retries = is_vq(model), channels_last, 0
        self.device = next(model.parameters()).device
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self._forward = _CompiledOrEager(self._moments, compile_backend) if compile else self._moments

    @property
    def compile_failure(self) -> Optional[str]:
        """Why ``compile=True`` fell back to the eager model, or None."""
        return getattr(self._forward, "failure", None)

    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior parameters (KL, mean and log-variance stacked as diffusers does) or latents (VQ)."""
        if self.vq:
            return self.model.encode(images).latents
        return self.model.encode(images).latent_dist.parameters

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, seeds: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """``pixels``: uint8 (B, 3, H, W) on the model's device; ``seeds``: one per image for ``sample``."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        images = to_model_input(pixels)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        moments, retried = run_with_fp32_fallback(self._forward, images, self.precision, retry=self._moments)
        self.fp32_retries += int(retried)
        if self.vq:
            return {"latent": moments.cpu(), "tokens": latents_to_indices(self.model, moments).cpu()}
        posterior = DiagonalGaussianDistribution(moments)
        out = {"latent": posterior.mean}
        if self.latent == "mean_logvar":
            out["logvar"] = posterior.logvar
        elif self.latent == "sample":
            # Noise from a per-image generator: the sample depends only on the image's seed, not on
            # the batch it fell in; stock diffusers gives the same with that generator and batch 1.
            noise = torch.cat([torch.randn((1, *posterior.mean.shape[1:]), generator=torch.Generator().manual_seed(s))
                               for s in seeds])
            out["latent"] = posterior.mean + posterior.std * noise.to(self.device)
        return {name: value.cpu() for name, value in out.items()}


# --------------------------------------------------------------------------- data loading


class _EncodeInputs(torch.utils.data.Dataset):
    """Source index -> preprocessed uint8 image and its record, or the reason it is unusable."""

    def __init__(self, source: ImageSource, preprocessing: Preprocessing):
        self.source, self.preprocessing = source, preprocessing

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            image, record = self.preprocessing(self.source.read(index))
        except (ImageReadError, SkippedInput) as err:
            return {"index": index, "failure": str(err)}
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {"index": index, "pixels": pixels, "record": record}


def _collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
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


# --------------------------------------------------------------------------- shards


class _ShardStore:
    """Shard files of one output directory: ``shard-000012.arrow`` + ``shard-000012.json``."""

    def __init__(self, output_dir: Path, shard_size: int, num_items: int):
        self.root, self.shard_size, self.num_items = output_dir / "shards", shard_size, num_items
        self.num_shards = max(1, math.ceil(num_items / shard_size))

    def indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.num_items, (shard + 1) * self.shard_size))

    def data_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:06d}.arrow"

    def manifest_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:06d}.json"

    def is_done(self, shard: int) -> bool:
        return self.manifest_path(shard).is_file()

    def manifest(self, shard: int) -> Dict[str, Any]:
        return json.loads(self.manifest_path(shard).read_text())

    def write(self, shard: int, table, failures: List[Dict[str, Any]]) -> None:
        import pyarrow as pa

        self.root.mkdir(parents=True, exist_ok=True)
        if table.num_rows:
            def write_stream(handle):
                with pa.ipc.new_stream(handle, table.schema) as writer:
                    writer.write_table(table)

            atomic_write_bytes(self.data_path(shard), write_stream)
        atomic_write_json(self.manifest_path(shard), {"shard": shard, "rows": table.num_rows, "failures": failures})


class _ShardAssembler:
    """Collects the encoded rows of the shards in flight and writes each one when complete."""

    def __init__(self, store: _ShardStore, source: ImageSource, options: EncodeOptions, features,
                 passthrough: Dict[str, str]):
        self.store, self.source, self.options, self.features = store, source, options, features
        self.passthrough = passthrough
        self.pending: Dict[int, Dict[str, Any]] = {}

    def _shard(self, shard: int) -> Dict[str, Any]:
        return self.pending.setdefault(shard, {"seen": 0, "parts": [], "failures": []})

    def add_rows(self, indices: List[int], records: List[Dict[str, Any]], encoded: Dict[str, torch.Tensor],
                 seeds: Optional[List[int]]) -> None:
        rows = {name: to_storage(value, self.options.dtype) for name, value in encoded.items() if name != "tokens"}
        keep = list(range(len(indices)))
        if self.options.dtype == "fp16":  # beyond ±65504: listed as failures, never stored as inf
            finite = np.array([np.isfinite(v.reshape(len(indices), -1)).all(axis=1) for v in rows.values()]).all(axis=0)
            for i in np.flatnonzero(~finite):
                self._fail(indices[i], "latent exceeds the fp16 range; encode with --dtype bf16 or fp32")
            keep = np.flatnonzero(finite).tolist()
        if not keep:
            return
        by_shard: Dict[int, List[int]] = {}
        for position in keep:
            by_shard.setdefault(indices[position] // self.store.shard_size, []).append(position)
        for shard, positions in by_shard.items():
            part = {name: array[positions] for name, array in rows.items()}
            if "tokens" in encoded:
                part["tokens"] = encoded["tokens"][positions].numpy().astype(np.int32)
            part["index"] = [indices[p] for p in positions]
            part["records"] = [records[p] for p in positions]
            part["seeds"] = [seeds[p] for p in positions] if seeds is not None else None
            entry = self._shard(shard)
            entry["parts"].append(part)
            entry["seen"] += len(positions)
            self._flush_if_complete(shard)

    def _fail(self, index: int, reason: str) -> None:
        shard = index // self.store.shard_size
        entry = self._shard(shard)
        entry["failures"].append({"index": index, "id": self.source.key(index), "reason": reason})
        entry["seen"] += 1
        self._flush_if_complete(shard)

    def add_failures(self, failures: List[Tuple[int, str]]) -> None:
        for index, reason in failures:
            self._fail(index, reason)

    def _flush_if_complete(self, shard: int) -> None:
        entry = self.pending[shard]
        if entry["seen"] == len(self.store.indices(shard)):
            del self.pending[shard]
            failures = sorted(entry["failures"], key=lambda f: f["index"])
            self.store.write(shard, self._table(entry["parts"]), failures)

    def _table(self, parts: List[Dict[str, Any]]):
        import pyarrow as pa

        schema = self.features.arrow_schema
        if not parts:
            return schema.empty_table()
        indices = [i for part in parts for i in part["index"]]
        records = [r for part in parts for r in part["records"]]
        columns: Dict[str, Any] = {
            "id": pa.array([self.source.key(i) for i in indices]),
            "index": pa.array(indices, pa.int64()),
            "latent_shape": pa.array([list(part["latent"].shape[1:]) for part in parts
                                      for _ in part["index"]], pa.list_(pa.int32())),
        }
        for name in ("latent", "logvar", "tokens"):
            if name in parts[0]:
                columns[name] = pa.concat_arrays([_nested_lists(part[name]) for part in parts])
        if "sample_seed" in schema.names:
            columns["sample_seed"] = pa.array([s for part in parts for s in part["seeds"]], pa.int64())
        for key in ("original_size", "resized_size", "crop_top_left", "target_size", "upscaled"):
            columns[key] = pa.array([r[key] for r in records])
        columns.update(self._passthrough(indices))
        table = pa.Table.from_arrays([columns[name].cast(schema.field(name).type) for name in schema.names],
                                     schema=schema)
        return table.take(pa.array(np.argsort(indices, kind="stable")))

    def _passthrough(self, indices: List[int]) -> Dict[str, Any]:
        """The source's other columns for these rows, as Arrow arrays: passed through unchanged."""
        if not self.passthrough:
            return {}
        table = _passthrough_dataset(self.source).select(indices).with_format("arrow")[:]
        return {new: table.column(name).combine_chunks() for name, new in self.passthrough.items()}


def _passthrough_dataset(source: ImageSource):
    """The source's other columns (captions, labels...) as a ``datasets.Dataset``, or None for folders."""
    dataset = getattr(source, "dataset", None)
    if dataset is None:
        return None
    return dataset.remove_columns([source.image_column])


# --------------------------------------------------------------------------- run identity


def model_fingerprint(model: Autoencoder) -> str:
    """SHA-256 of the weights: a resumed run must encode with exactly the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


def source_fingerprint(source: ImageSource) -> str:
    digest = hashlib.sha256(str(len(source)).encode())
    dataset = getattr(source, "dataset", None)
    if dataset is not None:
        digest.update(str(getattr(dataset, "_fingerprint", "")).encode())
    else:
        for index in range(len(source)):
            digest.update(source.key(index).encode() + b"\n")
    return digest.hexdigest()


def _model_path(model: Union[str, Path, Autoencoder]) -> Optional[str]:
    """Where ``decode`` can load the model from: an absolute local folder or a hub id."""
    name = model if isinstance(model, (str, Path)) else getattr(model.config, "_name_or_path", None)
    if not name:
        return None
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else str(name)


# --------------------------------------------------------------------------- the run


@dataclass
class EncodeSummary:
    """Counts of one encode: ``read`` inputs = ``encoded`` rows + ``failed`` (listed in ``failures_path``)."""

    output_dir: Path
    read: int
    encoded: int
    failed: int
    resumed: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    data_wait_fraction: float = 0.0
    fp32_retries: int = 0
    compile_failure: Optional[str] = None

    @property
    def failures_path(self) -> Path:
        return self.output_dir / "failures.jsonl"

    def to_json(self) -> Dict[str, Any]:
        return {**asdict(self), "output_dir": str(self.output_dir)}


def _accelerator(device: Optional[str]):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(
        # Several processes without CUDA (torchrun / accelerate launch on CPUs): gloo on CPU.
        cpu=(device == "cpu") or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1),
        # Processes wait for the slowest one before the merge; shares can differ by a shard or more.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=24))],
    )


OUTPUT_FILES = ("encode_config.json", "failures.jsonl", "summary.json", "dataset_info.json", "state.json")


def _clear_outputs(output_dir: Path) -> None:
    shutil.rmtree(output_dir / "shards", ignore_errors=True)
    for path in [*(output_dir / name for name in OUTPUT_FILES), *output_dir.glob("data-*.arrow")]:
        path.unlink(missing_ok=True)


def _differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a} -> {b}")
    return changed


def _prepare_output(output_dir: Path, identity: Dict[str, Any], overwrite: bool) -> str:
    """'fresh', 'resume' or 'complete'; refuses to mix two different encodes in one directory."""
    config_path = output_dir / "encode_config.json"
    if overwrite or not output_dir.exists() or not any(output_dir.iterdir()):
        return "fresh"
    if not config_path.is_file():
        raise ConfigError(f"{output_dir} is not empty and holds no latent_vae encode; choose a new --output-dir")
    previous = json.loads(config_path.read_text())
    changed = _differences(previous.get("identity", {}), identity)
    if changed:
        raise ConfigError(
            f"{output_dir} holds an encode with other settings ({'; '.join(changed[:3])}); "
            "rerun with the same settings to resume, choose a new --output-dir, or pass --overwrite to replace it")
    return "complete" if (output_dir / "summary.json").is_file() else "resume"


def _run_identity(vae: Autoencoder, source: ImageSource, opts: EncodeOptions, precision: str) -> Dict[str, Any]:
    """Everything that determines the rows: a resumed run must match it exactly."""
    return {
        "format": FORMAT_VERSION,
        "model": {"class": type(vae).__name__, "weights_sha256": model_fingerprint(vae)},
        "data": {"source": str(source.name), "inputs": len(source), "fingerprint": source_fingerprint(source),
                 "image_column": opts.image_column, "split": opts.split},
        "preprocessing": {"resolution": opts.resolution, "buckets": opts.buckets, "upscale": opts.upscale},
        "latent": {"mode": opts.latent, "seed": opts.seed, "dtype": opts.dtype, "precision": precision,
                   "tiled": opts.tiled, "tile_size": opts.tile_size if opts.tiled else None,
                   "tile_overlap": opts.tile_overlap if opts.tiled else None},
        "shard_size": opts.shard_size,
    }


def _load_inputs(model: Union[str, Path, Autoencoder], data: Union[str, Path, ImageSource, None],
                 opts: EncodeOptions) -> Tuple[Autoencoder, ImageSource, List[Failure]]:
    """The model (tiled if asked) and the image source, checked against the options before
    anything is written."""
    vae = load_autoencoder(str(model), subfolder=opts.subfolder) if isinstance(model, (str, Path)) else model
    if is_vq(vae) and opts.latent != "mean":
        raise ConfigError(f"--latent {opts.latent} needs a KL posterior; {type(vae).__name__} has none: "
                          "use --latent mean")
    factor = downsample_factor(vae)
    if opts.resolution % factor:
        raise ConfigError(f"--resolution {opts.resolution} is not a multiple of the model's downsampling factor "
                          f"{factor}; use {opts.resolution // factor * factor or factor}")
    if opts.tiled:
        configure_tiling(vae, opts.tile_size, opts.tile_overlap)
    if isinstance(data, ImageSource):
        return vae, data, []
    # Headers are not pre-verified: every input is read once, in the workers, and a bad one is
    # listed by the shard that holds it.
    source, scan_failures = open_source(None if data is None else str(data), opts.image_column, opts.split,
                                        verify=False)
    return vae, source, scan_failures


def _read_summary(output_dir: Path) -> EncodeSummary:
    return EncodeSummary(**{**json.loads((output_dir / "summary.json").read_text()), "output_dir": output_dir})


def encode_dataset(model: Union[str, Path, Autoencoder], data: Union[str, Path, ImageSource, None],
                   output_dir: Union[str, Path], **options: Any) -> EncodeSummary:
    """Encode every image of ``data`` into a ``datasets`` directory at ``output_dir``.

    ``model``: a diffusers folder, hub id, or an ``AutoencoderKL``/``VQModel`` instance.
    ``data``: an image folder, a ``save_to_disk`` dataset, a hub dataset name, an ``ImageSource``,
    or None (the scikit-image sample photos). ``options``: fields of ``EncodeOptions``.
    Run under ``accelerate launch``/``torchrun`` for several processes; every process returns
    the same summary.
    """
    from accelerate.utils import broadcast_object_list

    try:
        opts = EncodeOptions(**options)
    except TypeError as err:
        raise ConfigError(f"encode_dataset: {err}") from None
    opts.validate()
    output_dir = Path(output_dir).resolve()
    started = time.perf_counter()
    accelerator = _accelerator(opts.device)
    device = torch.device(opts.device) if opts.device else accelerator.device
    opts.batch_size = opts.batch_size or (16 if device.type == "cuda" else 1)
    vae, source, scan_failures = _load_inputs(model, data, opts)
    precision = resolve_precision(opts.precision, device, is_vq(vae))
    identity = _run_identity(vae, source, opts, precision)
    # Every process must be cutting the same input list into the same shards.
    if broadcast_object_list([identity["data"]["fingerprint"]])[0] != identity["data"]["fingerprint"]:
        raise DataError(f"{source.name} changed while the processes were listing it; rerun when it is stable")

    # ---------------------------------------------------------------- output directory: new, resumed or done
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output directory {output_dir} cannot be created ({err.strerror}); "
                          "choose another --output-dir") from None
    state = _prepare_output(output_dir, identity, opts.overwrite)
    accelerator.wait_for_everyone()  # every process has read the old state before it changes
    if state == "complete":
        return _read_summary(output_dir)
    store = _ShardStore(output_dir, opts.shard_size, len(source))
    resumed = sum(len(store.indices(j)) for j in range(store.num_shards) if store.is_done(j)) \
        if state == "resume" else 0
    factor = downsample_factor(vae)
    if state == "fresh" and accelerator.is_main_process:
        _clear_outputs(output_dir)
        atomic_write_json(output_dir / "encode_config.json", {
            "identity": identity, "model_path": _model_path(model), "subfolder": opts.subfolder,
            "latent_channels": latent_channels(vae), "downsample_factor": factor,
            "buckets": [list(b) for b in bucket_sizes(opts.resolution, factor)] if opts.buckets == "sdxl" else None,
        })
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- this process's shards
    vae.to(device)
    encoder = LatentEncoder(vae, opts.latent, precision, opts.channels_last, opts.compile, opts.compile_backend)
    passthrough = _passthrough_dataset(source)
    features, renamed = _features(opts, encoder.vq, passthrough.features if passthrough is not None else {})
    mine = [j for j in range(accelerator.process_index, store.num_shards, accelerator.num_processes)
            if not store.is_done(j)]
    timing = _encode_shards(encoder, _EncodeInputs(source, Preprocessing(opts.resolution, opts.buckets,
                                                                          opts.upscale, factor)),
                            _ShardAssembler(store, source, opts, features, renamed), mine, opts, device,
                            show_progress=opts.progress and accelerator.is_main_process)

    # ---------------------------------------------------------------- merge, once every shard is written
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _merge(output_dir, store, source, scan_failures, features, opts.keep_shards, **timing, resumed=resumed,
               fp32_retries=encoder.fp32_retries, seconds=time.perf_counter() - started,
               compile_failure=encoder.compile_failure)
    accelerator.wait_for_everyone()
    return _read_summary(output_dir)


def _encode_shards(encoder: LatentEncoder, inputs: _EncodeInputs, assembler: _ShardAssembler, shards: List[int],
                   opts: EncodeOptions, device: torch.device, show_progress: bool) -> Dict[str, float]:
    """Encode this process's pending shards in batches that never straddle two shards; returns
    the loop's throughput and the fraction of it spent waiting for input."""
    from tqdm.auto import tqdm

    batches = [list(indices[i:i + opts.batch_size]) for j in shards
               for indices in [assembler.store.indices(j)] for i in range(0, len(indices), opts.batch_size)]
    total = sum(len(b) for b in batches)
    if not batches:
        return {"images_per_second": 0.0, "data_wait_fraction": 0.0}
    loader = torch.utils.data.DataLoader(
        inputs, batch_sampler=batches, collate_fn=_collate,
        num_workers=opts.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=opts.prefetch_factor if opts.num_workers > 0 else None,
    )
    progress = tqdm(total=total, unit="img", desc="encode", disable=not show_progress, dynamic_ncols=True)
    start, waited, failed = time.perf_counter(), 0.0, 0
    iterator = iter(loader)
    with torch.inference_mode():
        while True:
            tick = time.perf_counter()
            batch = next(iterator, None)
            waited += time.perf_counter() - tick
            if batch is None:
                break
            for group in batch["groups"]:
                seeds = [derive_seed(opts.seed, i) for i in group["indices"]] if opts.latent == "sample" else None
                encoded = encoder(group["pixels"].to(device, non_blocking=True), seeds)
                assembler.add_rows(group["indices"], group["records"], encoded, seeds)
            assembler.add_failures(batch["failures"])
            failed += len(batch["failures"])
            progress.update(sum(len(g["indices"]) for g in batch["groups"]) + len(batch["failures"]))
            if failed:
                progress.set_postfix(failed=failed, refresh=False)
    progress.close()
    elapsed = time.perf_counter() - start
    return {"images_per_second": total / elapsed, "data_wait_fraction": waited / elapsed}


def _merge(output_dir: Path, store: _ShardStore, source: ImageSource, scan_failures: List[Failure], features,
           keep_shards: bool, **summary_fields: Any) -> None:
    """Concatenate the shards in index order into one ``datasets`` directory, check that every
    input is there exactly once (as a row or a failure), then mark the run complete."""
    import datasets

    missing = [j for j in range(store.num_shards) if not store.is_done(j)]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {output_dir} were not written; rerun the same command to finish")
    manifests = [store.manifest(j) for j in range(store.num_shards)]
    parts = [datasets.Dataset.from_file(str(store.data_path(j))) for j, m in enumerate(manifests) if m["rows"]]
    failures = [f for m in manifests for f in m["failures"]]
    indices = np.concatenate([np.asarray(p.with_format("numpy")["index"], dtype=np.int64) for p in parts]
                             + [np.asarray([f["index"] for f in failures], dtype=np.int64)])
    if len(indices) != len(source) or not np.array_equal(np.sort(indices), np.arange(len(source))):
        raise RuntimeError(f"{output_dir}: the shards do not hold every input exactly once; rerun with --overwrite")

    staging = output_dir / ".merge-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if parts:
        datasets.concatenate_datasets(parts).save_to_disk(str(staging), max_shard_size="1GB")
    else:  # every input failed: an empty dataset with the right columns
        datasets.Dataset.from_dict({name: [] for name in features}, features=features).save_to_disk(str(staging))
    for old in [*output_dir.glob("data-*.arrow"), output_dir / "dataset_info.json", output_dir / "state.json"]:
        old.unlink(missing_ok=True)
    for produced in staging.iterdir():
        os.replace(produced, output_dir / produced.name)
    shutil.rmtree(staging, ignore_errors=True)

    all_failures = [{"index": None, "id": f.key, "reason": f.reason} for f in scan_failures] + failures
    atomic_write_bytes(output_dir / "failures.jsonl",
                        lambda h: h.write("".join(json.dumps(f, sort_keys=True) + "\n" for f in all_failures).encode()))
    summary = EncodeSummary(output_dir=output_dir, read=len(source) + len(scan_failures),
                            encoded=len(source) - len(failures), failed=len(all_failures), **summary_fields)
    atomic_write_json(output_dir / "summary.json", {k: v for k, v in summary.to_json().items() if k != "output_dir"})
    if not keep_shards:
        shutil.rmtree(store.root, ignore_errors=True)


# --------------------------------------------------------------------------- decoding


def load_latent_dataset(path: Union[str, Path]) -> Tuple["datasets.Dataset", Dict[str, Any]]:
    """An encode output directory -> (``datasets.Dataset`` of its rows, its ``encode_config.json``)."""
    import datasets

    path = Path(path)
    if not (path / "summary.json").is_file():
        if (path / "encode_config.json").is_file():
            raise DataError(f"{path} is an unfinished encode; rerun the same encode command to complete it")
        raise FileNotFoundError(f"{path} is not an encode output of `latent-vae encode` (no summary.json)")
    return datasets.load_from_disk(str(path)), json.loads((path / "encode_config.json").read_text())


def stored_dtype(config: Dict[str, Any]) -> str:
    """The storage dtype (fp32/fp16/bf16) recorded in an ``encode_config.json``."""
    return config["identity"]["latent"]["dtype"]


@torch.no_grad()
def decode_images(model: Autoencoder, latents: torch.Tensor, precision: str = "fp32") -> Tuple[torch.Tensor, bool]:
    """Stock ``model.decode(latents).sample`` (VQ: quantised first, as diffusers does) in fp32,
    under ``precision`` autocast with the fp32 fallback; returns (images in [-1, 1], retried)."""
    return run_with_fp32_fallback(lambda z: model.decode(z).sample, latents, precision)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded."""
    from ..evaluate.metrics import to_unit_range

    return to_unit_range(images).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def preview_name(position: int, row_id: str) -> str:
    """A file name for a row: its position, then its id reduced to safe characters (an id from a
    dataset can never name a path outside the output directory)."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(row_id).with_suffix("").as_posix())
    return f"{position:06d}-{stem.strip('._')[:80]}.png"


@dataclass
class DecodeSummary:
    output_dir: Path
    written: List[Path]
    fp32_retries: int = 0


def decode_latents(latents_dir: Union[str, Path], output_dir: Union[str, Path],
                   model: Union[str, Path, Autoencoder, None] = None, limit: Optional[int] = 16,
                   batch_size: Optional[int] = None, precision: str = "auto", tiled: bool = False,
                   tile_size: Optional[int] = None, tile_overlap: float = 0.25, device: Optional[str] = None,
                   progress: bool = True) -> DecodeSummary:
    """Decode the first ``limit`` rows (all when None) of an encode output to PNG files.

    The model defaults to the one recorded by ``encode``; the stored latents are the raw
    (unscaled) ones, decoded as they are. ``batch_size`` defaults to 8 on CUDA, 1 on CPU.
    """
    from tqdm.auto import tqdm

    dataset, config = load_latent_dataset(latents_dir)
    reference = model or config.get("model_path")
    if reference is None:
        raise ConfigError(f"{latents_dir} does not record where its model is; pass --model")
    vae = load_autoencoder(str(reference), subfolder=config.get("subfolder")) \
        if isinstance(reference, (str, Path)) else reference
    if latent_channels(vae) != config["latent_channels"]:
        raise ConfigError(f"the latents have {config['latent_channels']} channels but {reference} expects "
                          f"{latent_channels(vae)}; pass the model that encoded them with --model")
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae.eval().requires_grad_(False).to(target)
    if tiled:
        configure_tiling(vae, tile_size, tile_overlap)
    precision = resolve_precision(precision, target, is_vq(vae))
    batch_size = batch_size or (8 if target.type == "cuda" else 1)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    rows = dataset.select(range(count)).select_columns(["id", "latent"]).with_format("numpy")
    dtype, written, retries = stored_dtype(config), [], 0
    for start in tqdm(range(0, count, batch_size), desc="decode", unit="batch", disable=not progress):
        batch = rows[start:start + batch_size]
        latents = [latent_to_tensor(value, dtype).float() for value in batch["latent"]]
        positions = list(range(start, start + len(latents)))
        for shape in dict.fromkeys(tuple(z.shape) for z in latents):  # buckets: one decode per shape
            members = [i for i, z in enumerate(latents) if tuple(z.shape) == shape]
            images, retried = decode_images(vae, torch.stack([latents[i] for i in members]).to(target), precision)
            retries += int(retried)
            for i, pixels in zip(members, images_to_uint8(images)):
                path = output_dir / preview_name(positions[i], str(batch["id"][i]))
                Image.fromarray(pixels).save(path)
                written.append(path)
    return DecodeSummary(output_dir, sorted(written), retries)
