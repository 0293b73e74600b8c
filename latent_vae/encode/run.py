"""One encode run: ``encode_dataset`` reads images (a folder, a ``save_to_disk`` dataset, a hub
dataset, or sharded input: webdataset/parquet shards, a streaming dataset), preprocesses them
(resize + centre crop, or SDXL-style aspect-ratio buckets, recorded per row), encodes them in
batches and writes::

    latents/
      data-*.arrow, dataset_info.json, state.json   --format datasets: datasets.load_from_disk("latents/")
      data/train-*.parquet | data/train-*.tar       --format parquet | webdataset: one file per shard
      encode_config.json   what defines the output (model, data, preprocessing, storage)
      failures.jsonl       one line per unusable input: {"index", "id", "reason"}
      summary.json         counts (read = encoded + failed); written last: the run is complete
      shards/              per-shard manifests (and, for datasets, the shards until the merge)

Resumable and loss-free: the inputs are cut into shards (``shard_size`` consecutive indices of
an image source; one output shard per input shard of a sharded input); shard ``j`` of the job
belongs to process ``j mod P`` and counts as done once its manifest exists
(``storage.ShardStore``) and its data matches the SHA-256 recorded there. A killed run restarted
with the same settings (any number of processes) redoes only the shards that are not done, a
shard truncated or garbled on disk included (named in a warning). The finish verifies every
shard again and checks that every input appears exactly once, as a row or as a failure.

One encode, one writer: the main process holds an exclusive lock on ``OUTPUT/.lock`` for the
whole run (``runtime.try_lock``: the kernel drops it when the process dies, even by SIGKILL);
the jobs of ``--shard-slice`` hold it shared, each with its slice's lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch

from ..data.sources import Failure, ImageSource, open_source
from ..data.streams import StreamSource, open_stream, split_shards
from ..distributed import make_accelerator
from ..errors import ConfigError, DataError
from ..models.loading import load_autoencoder
from ..models.stock import Autoencoder, downsample_factor, is_tiny, is_vq, latent_channels
from ..models.tiling import configure_tiling
from ..runtime import (atomic_write_bytes, atomic_write_json, configure_cpu_threads, fsync_path, resolve_precision,
                       try_lock)
from ..seeding import derive_seed
from .encoder import LatentEncoder
from .formats import check_webdataset_columns
from .hub import check_push_target, push_latent_set
from .identity import LOCK_NAME, model_path, prepare_output, run_identity
from .options import EncodeOptions
from .preprocess import EncodeInputs, Preprocessing, bucket_sizes, collate_by_size
from .storage import ShardAssembler, ShardStore, output_features, passthrough_dataset
from .streaming import StreamAssembler, StreamInputs, split_key

logger = logging.getLogger("latent_vae")

OUTPUT_FILES = ("encode_config.json", "failures.jsonl", "summary.json", "dataset_info.json", "state.json", "README.md")


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
    pending_shards: int = 0  # --shard-slice: shards of other slices not done yet (the encode is not complete)

    @property
    def failures_path(self) -> Path:
        return self.output_dir / "failures.jsonl"

    def to_json(self) -> Dict[str, Any]:
        return {**asdict(self), "output_dir": str(self.output_dir)}


def _read_summary(output_dir: Path) -> EncodeSummary:
    return EncodeSummary(**{**json.loads((output_dir / "summary.json").read_text()), "output_dir": output_dir})


def _clear_outputs(output_dir: Path) -> None:
    for folder in ("shards", "data"):
        shutil.rmtree(output_dir / folder, ignore_errors=True)
    for path in [*(output_dir / name for name in OUTPUT_FILES), *output_dir.glob("data-*.arrow")]:
        path.unlink(missing_ok=True)


def _accelerator(device: Optional[str]):
    from accelerate.utils import InitProcessGroupKwargs

    # Processes wait for the slowest one before the merge; shares can differ by a shard or more.
    return make_accelerator(force_cpu=device == "cpu",
                            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=24))])


def _load_inputs(model: Union[str, Path, Autoencoder], data: Union[str, Path, ImageSource, None],
                 opts: EncodeOptions) -> Tuple[Autoencoder, Union[ImageSource, StreamSource], List[Failure]]:
    """The model (tiled if asked) and the image source (or sharded input), checked against the
    options before anything is written."""
    vae = load_autoencoder(str(model), subfolder=opts.subfolder) if isinstance(model, (str, Path)) else model
    if (is_vq(vae) or is_tiny(vae)) and opts.latent != "mean":
        raise ConfigError(f"--latent {opts.latent} needs a KL posterior; {type(vae).__name__} has none: "
                          "use --latent mean")
    factor = downsample_factor(vae)
    multiple = factor * opts.patch_size
    if opts.resolution % multiple:
        raise ConfigError(f"--resolution {opts.resolution} is not a multiple of {multiple} (the model's downsampling "
                          f"factor {factor} × --patch-size {opts.patch_size}); use "
                          f"{opts.resolution // multiple * multiple or multiple}, or --patch-size 1 for a denoiser "
                          "that takes any latent size")
    if opts.tiled:
        configure_tiling(vae, opts.tile_size, opts.tile_overlap)
    if opts.sharded:  # read shard by shard, never listed or scanned up front
        if opts.streaming and data is None:
            raise ConfigError("--streaming reads the 🤗 dataset named by --data; give --data")
        if opts.shards and (data is not None or opts.streaming):
            raise ConfigError("--shards names the input itself: drop --data and --streaming, or drop --shards")
        stream = open_stream(opts.shards, None if opts.shards else str(data), opts.image_column, opts.split,
                             opts.key_column, opts.image_key)
        return vae, stream, []
    if isinstance(data, ImageSource):
        source, scan_failures = data, []
    else:
        # Headers are not pre-verified: every input is read once, in the workers, and a bad one is
        # listed by the shard that holds it.
        source, scan_failures = open_source(None if data is None else str(data), opts.image_column, opts.split,
                                            verify=False)
    if opts.output_format == "webdataset":
        check_webdataset_columns(passthrough_dataset(source))
    return vae, source, scan_failures


def encode_dataset(model: Union[str, Path, Autoencoder], data: Union[str, Path, ImageSource, None],
                   output_dir: Union[str, Path], **options: Any) -> EncodeSummary:
    """Encode every image of ``data`` into a ``datasets`` directory at ``output_dir``.

    ``model``: a diffusers folder, hub id, or an ``AutoencoderKL``/``VQModel``/``AutoencoderTiny`` instance.
    ``data``: an image folder, a ``save_to_disk`` dataset, a hub dataset name, an ``ImageSource``,
    or None (the bundled sample photos). ``options``: fields of ``EncodeOptions``.
    Run under ``accelerate launch``/``torchrun`` for several processes; every process returns
    the same summary.
    """
    from accelerate.utils import broadcast_object_list

    try:
        opts = EncodeOptions(**options)
    except TypeError as err:
        raise ConfigError(f"encode_dataset: {err}") from None
    opts.validate()
    if opts.push_to_hub:
        check_push_target(opts.push_to_hub)
    output_dir = Path(output_dir).resolve()
    started = time.perf_counter()
    accelerator = _accelerator(opts.device)
    device = torch.device(opts.device) if opts.device else accelerator.device
    configure_cpu_threads(device, opts.num_workers)
    opts.batch_size = opts.batch_size or (16 if device.type == "cuda" else 1)
    vae, source, scan_failures = _load_inputs(model, data, opts)
    precision = resolve_precision(opts.precision, device, is_vq(vae))
    identity = run_identity(vae, source, opts, precision)
    # Every process must be cutting the same input list into the same shards.
    if broadcast_object_list([identity["data"]["fingerprint"]])[0] != identity["data"]["fingerprint"]:
        raise DataError(f"{source.name} changed while the processes were listing it; rerun when it is stable")

    # ---------------------------------------------------------------- output directory: new, resumed or done
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output directory {output_dir} cannot be created ({err.strerror}); "
                          "choose another --output-dir") from None
    locks = _claim_output(output_dir, accelerator, opts)
    try:
        summary = _encode_into(output_dir, vae, source, scan_failures, identity, opts, precision, accelerator,
                               device, model, started)
        if opts.push_to_hub and accelerator.is_main_process and not summary.pending_shards:
            push_latent_set(output_dir, opts.push_to_hub, opts.hub_private)
        return summary
    finally:
        for lock in locks:
            lock.close()  # the folder is free for the next writer


def _claim_output(output_dir: Path, accelerator, opts: EncodeOptions) -> List[IO]:
    """One encode, one writer: the main process takes the exclusive lock of ``output_dir``; every
    process learns whether it did, so none waits in a collective for a process that gave up. The
    jobs of a ``--shard-slice`` share the folder: each holds the folder lock shared and the lock
    of its own slice exclusively (an unsliced job, or the same slice twice, is refused)."""
    from accelerate.utils import broadcast_object_list

    locks: List[IO] = []
    if accelerator.is_main_process:
        wanted = [(output_dir / LOCK_NAME, False)]
        if opts.shard_slice:
            index, count = opts.slice
            wanted = [(output_dir / LOCK_NAME, True), (output_dir / f"{LOCK_NAME}-slice-{index}-of-{count}", False)]
        for path, shared in wanted:
            lock = try_lock(path, shared=shared)
            if lock is None:
                for held in locks:
                    held.close()
                locks = [None]
                break
            locks.append(lock)
    if broadcast_object_list([None in locks])[0]:
        raise ConfigError(f"another encode is writing to {output_dir} (it holds {output_dir / LOCK_NAME}"
                          f"{' or this slice' if opts.shard_slice else ''}); wait for it to finish or choose another "
                          "--output-dir")
    return locks


def _verified_shards(store: ShardStore, shards: Sequence[int], accelerator) -> Set[int]:
    """Which of ``shards`` are done: verified once, by the main process, and shared with all (every
    process must skip the same ones). A shard whose files do not verify is named and redone."""
    from accelerate.utils import broadcast_object_list

    done: List[int] = []
    if accelerator.is_main_process:
        for shard in shards:
            problem = store.verify(shard)
            if problem is None:
                done.append(shard)
            elif problem != "not written":
                logger.warning("encode: redoing shard %d of %s: %s", shard, store.root, problem)
    return set(broadcast_object_list([done])[0])


def _encode_into(output_dir: Path, vae: Autoencoder, source: Union[ImageSource, StreamSource],
                 scan_failures: List[Failure], identity: Dict[str, Any], opts: EncodeOptions, precision: str,
                 accelerator, device: torch.device, model: Union[str, Path, Autoencoder],
                 started: float) -> EncodeSummary:
    """The run proper, in a folder this job holds the lock of: start, resume or return a finished encode."""
    from accelerate.utils import broadcast_object_list

    state = prepare_output(output_dir, identity, opts.overwrite)
    accelerator.wait_for_everyone()  # every process has read the old state before it changes
    if state == "complete":
        return _read_summary(output_dir)
    sharded = isinstance(source, StreamSource)
    # Sharded input: input shard j is output shard j. Images: shards of --shard-size consecutive inputs.
    store = ShardStore(output_dir, 1, len(source.shards), opts.output_format) if sharded else \
        ShardStore(output_dir, opts.shard_size, len(source), opts.output_format)
    job = split_shards(range(store.num_shards), *opts.slice)  # this job's slice: all shards without one
    done = _verified_shards(store, job, accelerator) if state == "resume" else set()
    resumed = sum(len(m["indices"]) + len(m["failures"]) for m in map(store.manifest, done))
    factor = downsample_factor(vae)
    multiple = factor * opts.patch_size
    if state == "fresh" and accelerator.is_main_process:
        if not opts.shard_slice:  # the slices of other jobs may be writing here already
            _clear_outputs(output_dir)
        atomic_write_json(output_dir / "encode_config.json", {
            "identity": identity, "model_path": model_path(model), "subfolder": opts.subfolder,
            "latent_channels": latent_channels(vae), "downsample_factor": factor,
            "buckets": [list(b) for b in bucket_sizes(opts.resolution, multiple)] if opts.buckets == "sdxl" else None,
        })
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- this process's shards
    vae.to(device)
    encoder = LatentEncoder(vae, opts.latent, precision, opts.channels_last, opts.compile, opts.compile_backend,
                            diffusion_input=opts.layout == "diffusers")
    passthrough = None if sharded else passthrough_dataset(source)
    side = opts.resolution // factor
    features, renamed = output_features(opts, encoder.vq, passthrough.features if passthrough is not None else {},
                                        None if opts.buckets == "sdxl" else (latent_channels(vae), side, side))
    mine = [j for j in split_shards(job, accelerator.process_index, accelerator.num_processes) if j not in done]
    preprocessing = Preprocessing(opts.resolution, opts.buckets, opts.upscale, multiple)
    if sharded:
        inputs = StreamInputs(source, [(j, source.shards[j]) for j in mine], preprocessing, opts.max_samples,
                              store.num_shards)
        timing = _encode_stream(encoder, inputs, StreamAssembler(store, opts, features), len(mine), opts, device,
                                accelerator)
    else:
        timing = _encode_shards(encoder, EncodeInputs(source, preprocessing),
                                ShardAssembler(store, source, opts, features, renamed), mine, opts, device,
                                show_progress=opts.progress and accelerator.is_main_process)

    # ---------------------------------------------------------------- merge, once every shard is written
    accelerator.wait_for_everyone()
    problem, pending = None, 0
    if accelerator.is_main_process:
        if opts.shard_slice:  # the job finishing last completes the encode
            pending = store.num_shards - len(_verified_shards_local(store))
        try:
            if not pending:
                _finish(output_dir, store, sharded, scan_failures, features, opts, _description(identity),
                        **timing, resumed=resumed, fp32_retries=encoder.fp32_retries,
                        seconds=time.perf_counter() - started, compile_failure=encoder.compile_failure)
        except DataError as err:
            problem = str(err)
    problem, pending = broadcast_object_list([problem, pending])[:2]  # every process ends the same way
    if problem:
        raise DataError(problem)
    if pending:
        return EncodeSummary(output_dir, *_counts(store, job), resumed=resumed, pending_shards=pending, **timing)
    return _read_summary(output_dir)


def _verified_shards_local(store: ShardStore) -> List[int]:
    return [j for j in range(store.num_shards) if store.verify(j) is None]


def _counts(store: ShardStore, shards: Sequence[int]) -> Tuple[int, int, int]:
    """(read, encoded, failed) over the finished shards among ``shards``."""
    manifests = [store.manifest(j) for j in shards if store.verify(j) is None]
    encoded, failed = sum(len(m["indices"]) for m in manifests), sum(len(m["failures"]) for m in manifests)
    return encoded + failed, encoded, failed


class _WaitTimer:
    """Iterates a DataLoader, adding up in ``waited`` the seconds spent waiting for its items
    (the encoder idle for want of input)."""

    def __init__(self, loader):
        self.loader, self.waited = loader, 0.0

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            tick = time.perf_counter()
            item = next(iterator, None)
            self.waited += time.perf_counter() - tick
            if item is None:
                return
            yield item


def _encode_stream(encoder: LatentEncoder, inputs: StreamInputs, assembler: StreamAssembler, shards: int,
                   opts: EncodeOptions, device: torch.device, accelerator) -> Dict[str, float]:
    """Encode this process's input shards, each read whole by one DataLoader worker; samples are
    batched as they arrive and a shard is written once its end has been read and encoded. Every
    process shows its own progress bar: shards done (with the ETA) and samples/s."""
    from tqdm.auto import tqdm

    if not shards:
        return {"images_per_second": 0.0, "data_wait_fraction": 0.0}
    loader = torch.utils.data.DataLoader(inputs, batch_size=None, num_workers=min(opts.num_workers, shards),
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=opts.prefetch_factor if opts.num_workers > 0 else None)
    rank = accelerator.process_index
    progress = tqdm(total=shards, unit="shard", desc=f"encode rank {rank}", position=rank, disable=not opts.progress,
                    dynamic_ncols=True)
    batch: List[Dict[str, Any]] = []
    start, samples, failed = time.perf_counter(), 0, 0

    def encode_batch() -> None:
        for group in collate_by_size([{**item, "index": item["key"]} for item in batch])["groups"]:
            seeds = [derive_seed(opts.seed, *split_key(key)) for key in group["indices"]] \
                if opts.latent == "sample" else None
            assembler.add_rows(group["indices"], group["records"],
                               encoder(group["pixels"].to(device, non_blocking=True), seeds), seeds)
        batch.clear()

    items = _WaitTimer(loader)
    with torch.inference_mode():
        for item in items:
            if "end" in item:  # the shard's samples are all here: encode the rest, then write it
                encode_batch()
                assembler.end_shard(item["shard"], item["end"])
                progress.update(1)
                continue
            assembler.note(item)
            samples += 1
            if "failure" in item:
                assembler.add_failures([(item["key"], item["failure"])])
                failed += 1
                continue
            batch.append(item)
            if len(batch) == opts.batch_size:
                encode_batch()
            progress.set_postfix({"img/s": f"{samples / (time.perf_counter() - start):.1f}", "failed": failed},
                                 refresh=False)
    progress.close()
    elapsed = time.perf_counter() - start
    return {"images_per_second": samples / elapsed, "data_wait_fraction": items.waited / elapsed}


def _encode_shards(encoder: LatentEncoder, inputs: EncodeInputs, assembler: ShardAssembler, shards: List[int],
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
        inputs, batch_sampler=batches, collate_fn=collate_by_size,
        num_workers=opts.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=opts.prefetch_factor if opts.num_workers > 0 else None,
    )
    progress = tqdm(total=total, unit="img", desc="encode", disable=not show_progress, dynamic_ncols=True)
    start, failed = time.perf_counter(), 0
    batches = _WaitTimer(loader)
    with torch.inference_mode():
        for batch in batches:
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
    return {"images_per_second": total / elapsed, "data_wait_fraction": batches.waited / elapsed}


def _description(identity: Dict[str, Any]) -> str:
    """The dataset's own description (``dataset_info.json``): what the rows are, and for the
    diffusers layout the scale and shift that made ``model_input`` from ``latent``."""
    latent = identity["latent"]
    text = (f"latent_vae encode of {identity['data']['source']} with a {identity['model']['class']} "
            f"(weights SHA-256 {identity['model']['weights_sha256'][:16]}...): latent = {latent['mode']} "
            f"(unscaled), stored as {latent['dtype']}.")
    if latent["diffusion_scaling"]:
        text += f" {latent['diffusion_scaling']['formula']}; " + json.dumps(
            {k: v for k, v in latent["diffusion_scaling"].items() if k != "formula"}, sort_keys=True)
    return text


def _finish(output_dir: Path, store: ShardStore, sharded: bool, scan_failures: List[Failure], features,
            opts: EncodeOptions, description: str, **summary_fields: Any) -> None:
    """Verify every shard and check that every input is there exactly once (as a row or a
    failure); merge the shards of a ``datasets`` output; then mark the run complete."""
    problems = {j: store.verify(j) for j in range(store.num_shards)}
    bad = {j: problem for j, problem in problems.items() if problem is not None}
    if bad:  # never merged: the rerun redoes exactly these shards
        shard, problem = next(iter(bad.items()))
        raise DataError(f"{len(bad)} shards of {output_dir} are not usable (shard {shard}: {problem}); "
                        "rerun the same command to redo them")
    manifests = [store.manifest(j) for j in range(store.num_shards)]
    for j, manifest in enumerate(manifests):
        # Image inputs: shard j holds its range of indices. Sharded input: the samples of input shard
        # j, counted from 0 (its length is what was read).
        found = sorted(manifest["indices"] + [f["index"] for f in manifest["failures"]])
        if found != list(range(len(found)) if sharded else store.indices(j)):
            raise DataError(f"{output_dir}: shard {j} does not hold each of its inputs exactly once; "
                            "rerun with --overwrite")
    failures = [f for m in manifests for f in m["failures"]]
    if opts.output_format == "datasets":
        _merge(output_dir, store, manifests, features, description)

    all_failures = [{"index": None, "id": f.key, "reason": f.reason} for f in scan_failures] + failures
    atomic_write_bytes(output_dir / "failures.jsonl",
                       lambda h: h.write("".join(json.dumps(f, sort_keys=True) + "\n" for f in all_failures).encode()))
    encoded = sum(len(m["indices"]) for m in manifests)
    summary = EncodeSummary(output_dir=output_dir, read=encoded + len(all_failures), encoded=encoded,
                            failed=len(all_failures), **summary_fields)
    atomic_write_json(output_dir / "summary.json", {k: v for k, v in summary.to_json().items() if k != "output_dir"})
    # The manifests of parquet and webdataset shards stay: they are the SHA-256 record of the final files.
    if opts.output_format == "datasets" and not opts.keep_shards:
        shutil.rmtree(store.root, ignore_errors=True)


def _merge(output_dir: Path, store: ShardStore, manifests: List[Dict[str, Any]], features, description: str) -> None:
    """Concatenate the shards in index order into one ``datasets.load_from_disk`` folder."""
    import datasets

    parts = [datasets.Dataset.from_file(str(store.data_path(j))) for j, m in enumerate(manifests) if m["rows"]]
    staging = output_dir / ".merge-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    merged = datasets.concatenate_datasets(parts) if parts else \
        datasets.Dataset.from_dict({name: [] for name in features}, features=features)  # every input failed
    merged.info.description = description
    merged.save_to_disk(str(staging), max_shard_size="1GB")
    # The dataset's files join the run's own files in output_dir, so this is a per-file move, not a
    # folder swap (runtime.replace_dir); a kill part-way leaves no summary.json, and the rerun merges again.
    for old in [*output_dir.glob("data-*.arrow"), output_dir / "dataset_info.json", output_dir / "state.json"]:
        old.unlink(missing_ok=True)
    for produced in staging.iterdir():
        os.replace(produced, output_dir / produced.name)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_path(output_dir)  # the moves are on disk before summary.json says the run is complete
