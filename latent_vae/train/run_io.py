"""What a run reads and writes besides its training steps: the run directory, checkpoints of the
``TrainState``, the training loader, the exported model and ``summary.json`` (validation and
previews: ``validation.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import Config, config_to_dict
from ..data.datasets import TrainBatchSampler, TrainDataset, ValidationDataset, collate
from ..data.stream_dataset import StreamLoader, StreamTrainDataset
from ..distributed import all_reduce_sum_
from ..errors import CheckpointError, TrainingError
from ..interop.export import compute_scaling_factor, save_diffusers_model, set_tile_size, write_model_card
from ..interop.hub import push_model_folder
from ..models.stock import Autoencoder
from ..runtime import try_lock
from . import checkpoint as ckpt
from .state import TrainState, effective_learning_rate

logger = logging.getLogger("latent_vae")


@dataclass
class RunSummary:
    output_dir: Path
    steps: int
    images_seen: int
    skipped_steps: int
    failed_inputs: int
    val_metrics: Dict[str, float] = field(default_factory=dict)
    initial_val_metrics: Dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    model_dir: Optional[Path] = None
    step_seconds: List[float] = field(default_factory=list)
    latent_drift: Optional[Dict[str, Any]] = None


def check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"output directory {output_dir} is not writable ({err.strerror}); choose another --output-dir") from None


# What a run writes into its folder (besides the lock): a fresh run refuses a folder holding any of them.
RUN_OUTPUTS = ("checkpoints", "model", "samples", "logs", "config.yaml", "summary.json", "train.log",
               "skipped_inputs.txt")


def claim_run_dir(output_dir: Path, resume: Optional[str], overwrite: bool, accelerator):
    """One run, one writer: an exclusive lock on ``<run>/.lock`` for the whole run (the kernel drops it
    when its holder dies, even by SIGKILL), and a fresh run never mixes with an earlier one. Every
    process learns the outcome, so none waits in a collective for a rank that gave up."""
    problem, lock = "", None
    if accelerator.is_main_process:
        lock = try_lock(output_dir / ".lock")
        if lock is None:
            problem = (f"another training process is writing to {output_dir} (it holds {output_dir / '.lock'}); "
                       "wait for it to finish or choose another --output-dir")
        else:  # temporaries of an interrupted checkpoint or export: never complete, safe to drop under the lock
            ckpt.discard_staging(output_dir / "checkpoints")
            for leftover in [*output_dir.glob(".model.tmp-*"), *output_dir.glob(".model.old-*")]:
                shutil.rmtree(leftover, ignore_errors=True)
        existing = [name for name in RUN_OUTPUTS if (output_dir / name).is_file()
                    or ((output_dir / name).is_dir() and any((output_dir / name).iterdir()))]
        if not problem and existing and not resume:
            if overwrite:
                for name in existing:
                    path = output_dir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            else:
                problem = (f"{output_dir} already holds a run ({', '.join(existing)}): continue it with --resume latest, "
                           "replace it with --overwrite, or choose another --output-dir")
    failed = all_reduce_sum_(torch.tensor(float(bool(problem)), device=accelerator.device)).item() > 0
    if failed:
        if lock is not None:
            lock.close()
        raise TrainingError(problem or f"the main process could not claim {output_dir}")
    return lock


class RunStart:
    """What starting a run adds to its folder, taken back when the start fails before the first step:
    the folder itself if this start made it, else the entries it added (a failed resume keeps the
    run it meant to resume). Only once this process holds the folder's lock, and only the main
    process: before that the folder may be another trainer's."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.existed = output_dir.is_dir()
        self.entries = set(os.listdir(output_dir)) if self.existed else set()
        self.owner = False

    def __enter__(self) -> "RunStart":
        return self

    def __exit__(self, error_type, error, traceback) -> bool:
        if error_type is not None:
            self.undo()
        return False  # the error goes on to the caller

    def claimed(self, is_main: bool) -> None:
        self.owner = is_main

    def training(self) -> None:
        self.owner = False  # the first step begins: the folder holds a run from now on

    def undo(self) -> None:
        if not self.owner:
            return
        for handler in list(logger.handlers):  # train.log is about to go: stop writing to it
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == self.output_dir:
                logger.removeHandler(handler)
                handler.close()
        if not self.existed:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return
        for name in set(os.listdir(self.output_dir)) - self.entries:
            path = self.output_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def write_summary(summary: RunSummary) -> None:
    payload = {
        "steps": summary.steps, "images_seen": summary.images_seen, "skipped_steps": summary.skipped_steps,
        "failed_inputs": summary.failed_inputs, "val_metrics": summary.val_metrics,
        "initial_val_metrics": summary.initial_val_metrics,
        "stopped_early": summary.stopped_early, "latent_drift": summary.latent_drift,
        "model_dir": str(summary.model_dir) if summary.model_dir else None,
    }
    (summary.output_dir / "summary.json").write_text(json.dumps(payload, indent=2))


# --------------------------------------------------------------------------- checkpoints


# The config keys that define what a checkpoint holds, by section: a run resumes only a checkpoint that agrees.
ARCHITECTURE_KEYS = {"model": ("preset", "pretrained", "subfolder", "config", "trainable")}


def find_resume_checkpoint(output_dir: Path, resume: Optional[str], cfg: Config, num_processes: int,
                           accept_changed_batch: bool = False,
                           identity: Dict[str, Tuple[str, ...]] = ARCHITECTURE_KEYS) -> Optional[Path]:
    """The checkpoint ``--resume`` names, if any; only a run agreeing on the ``identity`` keys resumes it,
    and one with another batch layout only when the user accepted what that changes."""
    path = ckpt.find_checkpoint(output_dir, resume) if resume else None
    if path is None:
        return None
    metadata, current = ckpt.load_metadata(path), config_to_dict(cfg)
    saved = metadata["config"]
    diffs = [f"{section}.{k}: checkpoint {saved.get(section, {}).get(k)!r} vs now {current[section][k]!r}"
             for section, keys in identity.items() for k in keys
             if saved.get(section, {}).get(k) != current[section][k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by an incompatible config: " + "; ".join(diffs))
    change = _batch_change(metadata, cfg, num_processes)
    if change and not accept_changed_batch:
        raise CheckpointError(f"checkpoint {path} was written with {change}; confirm with --accept-changed-batch, "
                              "or keep the global batch (train.batch_size × train.grad_accum_steps × processes)")
    if change:
        logger.warning("resuming with a changed batch layout (accepted): %s", change)
    return path


def _batch_change(metadata: Dict[str, Any], cfg: Config, num_processes: int) -> str:
    """What resuming a run with another global batch (batch size × accumulation × processes) changes,
    or ''. The sample stream resumes at step × global batch, so another global batch repeats or
    skips samples; under ``train.lr_scaling=linear`` the learning rate follows the global batch."""
    saved, step = metadata["config"]["train"], int(metadata["step"])
    before = (saved.get("batch_size", 1), saved.get("grad_accum_steps", 1), int(metadata.get("num_processes", 1)))
    now = (cfg.train.batch_size, cfg.train.grad_accum_steps, num_processes)
    if math.prod(before) == math.prod(now):
        return ""
    consumed, start = step * math.prod(before), step * math.prod(now)
    text = (f"a global batch of {math.prod(before)} (batch {before[0]} × accumulation {before[1]} × {before[2]} "
            f"processes), this run has {math.prod(now)} ({now[0]} × {now[1]} × {now[2]}): the sample stream would "
            f"continue at sample {start}, not {consumed} ({abs(start - consumed)} samples "
            f"{'skipped' if start > consumed else 'repeated'})")
    lr_before = saved.get("learning_rate", cfg.train.learning_rate)
    if saved.get("lr_scaling", cfg.train.lr_scaling) == "linear":
        lr_before *= math.prod(before)
    lr_now = effective_learning_rate(cfg, num_processes)
    if lr_before != lr_now:
        text += f", and the learning rate changes from {lr_before:.3g} to {lr_now:.3g} (train.lr_scaling=linear)"
    return text


def restore_checkpoint(path: Path, state: TrainState, accelerator) -> Tuple[int, int, Dict[str, float]]:
    """Load ``path`` into ``state`` and this process's RNG; returns (step, skipped steps, the run's
    validation metrics before its first step)."""
    try:
        state.load_state_dict(ckpt.load_state(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path} was refused: its training state holds pickled objects "
                              f"that could run code ({str(err).splitlines()[0]})") from None
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {err}") from None
    rng = ckpt.load_rank_file(path, accelerator.process_index)
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], accelerator.device)
    metadata = ckpt.load_metadata(path)
    return int(metadata["step"]), int(metadata.get("skipped_steps", 0)), metadata.get("initial_val_metrics", {})


def save_checkpoint(root: Path, state: TrainState, step: int, skipped_steps: int, accelerator,
                    cfg_dict: Dict, initial_val_metrics: Dict[str, float], loader=None) -> None:
    """``<root>/checkpoint-<step>``, written by all processes together (see ``checkpoint.py``); each
    process's rank file also holds its position in a sharded data stream (``loader.state_dict()``).

    Every process reaches every barrier even when a write fails, then all agree to stop: a
    full disk on one rank must not leave the others waiting forever.
    """
    errors: List[str] = []
    if accelerator.is_main_process:
        _attempt(errors, ckpt.prepare_staging, root, step)
    accelerator.wait_for_everyone()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    if isinstance(loader, StreamLoader):
        rng["data"] = loader.state_dict()
    if not errors:
        _attempt(errors, ckpt.write_rank_file, root, step, accelerator.process_index, rng)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not errors:
        metadata = {"step": step, "skipped_steps": skipped_steps, "config": cfg_dict,
                    "num_processes": accelerator.num_processes, "initial_val_metrics": initial_val_metrics}
        path = _attempt(errors, ckpt.commit, root, step, state.state_dict(), metadata, accelerator.num_processes)
        if path is not None:
            ckpt.prune(root, cfg_dict["train"]["keep_checkpoints"])
            logger.info("checkpoint written: %s", path)
    failed = all_reduce_sum_(torch.tensor(float(bool(errors)), device=accelerator.device)).item() > 0
    if failed:
        if accelerator.is_main_process:
            ckpt.discard_staging(root)
        previous = ckpt.list_checkpoints(root)
        raise TrainingError(
            f"writing the checkpoint of step {step} failed ({'; '.join(errors) or 'on another process'}); "
            + (f"the previous checkpoint {previous[-1]} is intact: free space or fix the output "
               "directory, then continue with --resume latest" if previous else "no earlier checkpoint exists"))


def _attempt(errors: List[str], function, *args):
    """Call ``function``; a write failure (disk full, permissions...) is recorded instead of raised.
    safetensors reports a full disk as ``SafetensorError``, which is not an OSError."""
    from safetensors import SafetensorError

    try:
        return function(*args)
    except (OSError, SafetensorError) as err:
        errors.append(f"{type(err).__name__}: {err}")
        return None


# --------------------------------------------------------------------------- data


def train_loader(dataset, cfg: Config, accelerator, start_step: int, checkpoint_path: Optional[Path] = None):
    """This process's share of the training stream, from the first batch of ``start_step`` on. A sharded
    stream continues from the position saved in the checkpoint's rank file (``save_checkpoint``)."""
    start_batch = start_step * cfg.train.grad_accum_steps
    workers = cfg.data.num_workers
    options = dict(num_workers=workers, pin_memory=cfg.data.pin_memory and accelerator.device.type == "cuda",
                   prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None)
    if isinstance(dataset, StreamTrainDataset):
        rank_file = ckpt.load_rank_file(checkpoint_path, accelerator.process_index) if checkpoint_path else None
        batches = dataset.batches(cfg.train.batch_size, cfg.train.seed, accelerator.process_index,
                                  accelerator.num_processes, start_batch, (rank_file or {}).get("data"))
        return StreamLoader(batches, **options)
    sampler = TrainBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, accelerator.process_index,
                                accelerator.num_processes, start_batch=start_batch)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **options)


# --------------------------------------------------------------------------- export


def export_model(cfg: Config, cfg_dict: Dict, vae: Autoencoder, train_dataset: TrainDataset, accelerator,
                 output_dir: Path, step: int, val_metrics: Dict[str, float], drift: Optional[Dict] = None) -> Path:
    """``<output>/model``: the (EMA) weights as a stock diffusers folder, scaling factor from data."""
    model_dir = output_dir / "model"
    if accelerator.is_main_process:
        vae.eval()
        scaling_note = _set_scaling_factor(cfg, vae, train_dataset, accelerator)
        notes = [scaling_note] if scaling_note else []
        notes.append("exported weights: " + ("EMA" if cfg.train.ema_decay and cfg.train.export_ema else "raw (no EMA)"))
        if drift is not None:
            notes.append(f"latent drift against {cfg.model.pretrained} on the validation images: relative L2 "
                         f"{drift['relative_l2']:.3g} (scaled latents {drift['scaled_relative_l2']:.3g}); "
                         + ("the encoder was frozen (model.trainable=decoder)" if cfg.model.trainable == "decoder"
                            else "the encoder was trained: diffusion models trained on the starting latents may not transfer"))
        set_tile_size(vae, cfg.data.resolution)
        save_diffusers_model(vae, model_dir)
        write_model_card(model_dir, vae, cfg_dict, step, val_metrics, notes, repo_id=cfg.export.push_to_hub)
        logger.info("model exported to %s (load with diffusers %s.from_pretrained)", model_dir, type(vae).__name__)
        if cfg.export.push_to_hub:
            url = push_model_folder(model_dir, cfg.export.push_to_hub, private=cfg.export.hub_private)
            logger.info("model pushed to %s", url)
    accelerator.wait_for_everyone()
    return model_dir


def _set_scaling_factor(cfg: Config, vae: Autoencoder, train_dataset: TrainDataset, accelerator) -> Optional[str]:
    """The exported ``scaling_factor``, and a model-card note saying where it came from."""
    if cfg.export.scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(cfg.export.scaling_factor))
        return "scaling_factor set by export.scaling_factor"
    if cfg.model.pretrained:
        # A fine-tune keeps the latent normalisation diffusion models were trained with;
        # `latent-vae stats --write-to` recomputes it deliberately if the encoder moved.
        return f"scaling_factor kept from {cfg.model.pretrained}"
    if cfg.export.scaling_images <= 0:
        return None
    dataset = ValidationDataset(train_dataset.sample_source(cfg.export.scaling_images), cfg.data)
    count = len(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, collate_fn=collate)
    batches = (b["pixel_values"].to(accelerator.device) for b in loader if b["pixel_values"] is not None)
    with accelerator.autocast():
        factor = compute_scaling_factor(vae, batches, seed=cfg.train.seed)
    if factor is None:
        return None
    vae.register_to_config(scaling_factor=factor)
    return f"scaling_factor = 1/std of latents over {count} training images"
