"""What a run reads and writes besides its training steps: the run directory, checkpoints of the
``TrainState``, the data loaders, validation, reconstruction previews, the exported model and
``summary.json``.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import Config, config_to_dict
from ..data.datasets import TrainBatchSampler, TrainDataset, ValidationDataset, collate
from ..data.images import image_grid
from ..distributed import all_reduce_sum_
from ..errors import CheckpointError, TrainingError
from ..evaluate.compare import latent_drift
from ..evaluate.diffusability import model_statistics, summary_metrics
from ..evaluate.metrics import psnr_per_image, ssim_per_image
from ..interop.export import compute_scaling_factor, save_diffusers_model, write_model_card
from ..models.stock import Autoencoder, reconstruct
from . import checkpoint as ckpt
from .state import TrainState

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
    import fcntl

    problem, lock = "", None
    if accelerator.is_main_process:
        lock = open(output_dir / ".lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            problem = (f"another training process is writing to {output_dir} (it holds {output_dir / '.lock'}); "
                       "wait for it to finish or choose another --output-dir")
        # temporaries of an interrupted checkpoint or export: never complete, safe to drop under the lock
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


def find_resume_checkpoint(output_dir: Path, resume: Optional[str], cfg: Config) -> Optional[Path]:
    """The checkpoint ``--resume`` names, if any; only a run with the same architecture resumes it."""
    path = ckpt.find_checkpoint(output_dir, resume) if resume else None
    if path is None:
        return None
    saved, current = ckpt.load_metadata(path)["config"], config_to_dict(cfg)
    keys = ("preset", "pretrained", "subfolder", "config", "trainable")
    diffs = [f"model.{k}: checkpoint {saved['model'].get(k)!r} vs now {current['model'][k]!r}"
             for k in keys if saved["model"].get(k) != current["model"][k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by an incompatible config: " + "; ".join(diffs))
    return path


def restore_checkpoint(path: Path, state: TrainState, accelerator) -> Tuple[int, int]:
    """Load ``path`` into ``state`` and this process's RNG; returns (step, skipped steps)."""
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
    return int(metadata["step"]), int(metadata.get("skipped_steps", 0))


def save_checkpoint(root: Path, state: TrainState, step: int, skipped_steps: int, accelerator,
                    cfg_dict: Dict) -> None:
    """``<root>/checkpoint-<step>``, written by all processes together (see ``checkpoint.py``).

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
    if not errors:
        _attempt(errors, ckpt.write_rank_file, root, step, accelerator.process_index, rng)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not errors:
        metadata = {"step": step, "skipped_steps": skipped_steps, "config": cfg_dict,
                    "num_processes": accelerator.num_processes}
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


def train_loader(dataset: TrainDataset, cfg: Config, accelerator, start_step: int):
    """This process's share of the training stream, from the first batch of ``start_step`` on."""
    sampler = TrainBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, accelerator.process_index,
                                accelerator.num_processes, start_batch=start_step * cfg.train.grad_accum_steps)
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=cfg.data.pin_memory and accelerator.device.type == "cuda",
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
    )


def validation_loader(source, cfg: Config, accelerator):
    dataset = ValidationDataset(source, cfg.data, cfg.data.val_crops)
    shard = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    workers = min(cfg.data.num_workers, 2)
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=cfg.train.batch_size, collate_fn=collate,
        num_workers=workers, persistent_workers=workers > 0,
    )


def preview_batch(val_loader, train_dataset, device, count: int = 8) -> torch.Tensor:
    """Fixed images for the reconstruction grids: the first validation crops (or training crops)."""
    if val_loader is not None:
        images = []
        for batch in val_loader:
            if batch["pixel_values"] is not None:
                images.append(batch["pixel_values"])
            if sum(len(i) for i in images) >= count:
                break
        if images:
            return torch.cat(images)[:count].to(device)
    items = [train_dataset[(i % len(train_dataset), i)]["pixel_values"] for i in range(count)]
    return torch.stack(items).to(device)


# --------------------------------------------------------------------------- what a run shows


@torch.no_grad()
def log_preview(preview: torch.Tensor, vae: Autoencoder, accelerator, output_dir: Path, step: int) -> None:
    """Inputs (top row) above their reconstructions: ``samples/reconstructions-<step>.png`` and the trackers."""
    if not accelerator.is_main_process:
        return
    with accelerator.autocast():
        recon = reconstruct(vae, preview)
    grid = image_grid(torch.cat([preview, recon]), columns=len(preview))
    samples = output_dir / "samples"
    samples.mkdir(exist_ok=True)
    grid.save(samples / f"reconstructions-{step:08d}.png")
    pixels = np.asarray(grid)  # HWC uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("reconstructions", pixels, step, dataformats="HWC")
        else:
            tracker.log_images({"reconstructions": [pixels]}, step=step)


@torch.no_grad()
def validate(vae: Autoencoder, loader, accelerator, step: int, diffusability: bool = False) -> Dict[str, float]:
    """Mean PSNR/SSIM of reconstructions (posterior mean) over the validation set, all processes;
    logged as ``val/<metric>`` at ``step``. ``diffusability`` (``logging.diffusability``) adds the
    latent high-frequency fraction and the equivariance PSNRs (``evaluate.diffusability``)."""
    was_training = vae.training
    vae.eval()
    statistics = model_statistics(vae, accelerator.device) if diffusability else None
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        if batch["pixel_values"] is None:
            continue
        images = batch["pixel_values"].to(accelerator.device)
        with accelerator.autocast():
            recon = reconstruct(vae, images)
            if statistics is not None:
                statistics.update(images)
        sums += torch.stack([psnr_per_image(recon, images).sum(), ssim_per_image(recon, images).sum(),
                             torch.tensor(float(len(images)), device=images.device)]).double()
    vae.train(was_training)
    all_reduce_sum_(sums)
    count = max(sums[2].item(), 1.0)
    metrics = {"psnr": sums[0].item() / count, "ssim": sums[1].item() / count}
    if statistics is not None:
        metrics.update(summary_metrics(statistics.result()))
    accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    logger.info("step %d validation: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def report_latent_drift(initial_vae: Autoencoder, vae: Autoencoder, val_loader, accelerator, cfg: Config,
                        step: int) -> Dict[str, Any]:
    """How far a fine-tune moved the latents of the validation images from the starting model's."""
    drift = latent_drift(initial_vae.to(accelerator.device), vae,
                         (b["pixel_values"] for b in val_loader if b["pixel_values"] is not None))
    accelerator.log({"val/latent_drift": drift["relative_l2"],
                     "val/scaled_latent_drift": drift["scaled_relative_l2"]}, step=step)
    logger.info("latent drift against the starting model (%s): relative L2 %.3g, scaled %.3g%s",
                cfg.model.pretrained, drift["relative_l2"], drift["scaled_relative_l2"],
                " (encoder frozen)" if cfg.model.trainable == "decoder" else "")
    return drift


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
        save_diffusers_model(vae, model_dir)
        write_model_card(model_dir, vae, cfg_dict, step, val_metrics, notes)
        logger.info("model exported to %s (load with diffusers %s.from_pretrained)", model_dir, type(vae).__name__)
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
    dataset = ValidationDataset(train_dataset.source, cfg.data)
    count = min(cfg.export.scaling_images, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(count)),
                                         batch_size=cfg.train.batch_size, collate_fn=collate)
    batches = (b["pixel_values"].to(accelerator.device) for b in loader if b["pixel_values"] is not None)
    with accelerator.autocast():
        factor = compute_scaling_factor(vae, batches, seed=cfg.train.seed)
    if factor is None:
        return None
    vae.register_to_config(scaling_factor=factor)
    return f"scaling_factor = 1/std of latents over {count} training images"
