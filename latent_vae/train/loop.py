"""The training run for KL and VQ autoencoders on Accelerate.

``train()`` reads top to bottom: run directory and Accelerator, data, the ``TrainState``
(models, losses, optimisers; ``state.py``), resume, then the loop (``run_steps``, which ``distill``
shares) — every step is ``train_step`` (``step.py``: the generator update, then the discriminator
update on the same detached reconstructions), followed by what falls due at that step: logging, previews,
validation, a checkpoint, a stop — and finally the export of a stock diffusers model folder.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate.utils import DistributedDataParallelKwargs

from ..config import Config, config_to_dict, save_config
from ..data.stream_dataset import training_data
from ..distributed import make_accelerator
from ..errors import ConfigError
from ..interop.hub import hub_api
from ..runtime import configure_cpu_threads
from .guard import StepGuard, StopRequest
from .monitor import FailureLog, TrainingLog, check_trackers, flat_hparams, setup_logging
from .run_io import (
    RunStart,
    RunSummary,
    check_writable,
    claim_run_dir,
    export_model,
    find_resume_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    train_loader,
    write_summary,
)
from .state import TrainState, build_state
from .step import train_step
from .trainable import build_trainable_vae
from .validation import log_preview, preview_batch, report_latent_drift, validate, validation_loader

logger = logging.getLogger("latent_vae")


def train(config: Config, output_dir: str | Path, resume: Optional[str] = None, overwrite: bool = False,
          accept_changed_batch: bool = False) -> RunSummary:
    """``accept_changed_batch``: resume even when the global batch changes the sample stream or the
    learning rate (``--accept-changed-batch``). A start that fails before its first step takes back
    what it added to the run folder (``RunStart``)."""
    with RunStart(Path(output_dir).resolve()) as start:
        return _train(config, start, resume, overwrite, accept_changed_batch)


def _train(cfg: Config, start: RunStart, resume: Optional[str], overwrite: bool,
           accept_changed_batch: bool) -> RunSummary:
    output_dir = start.output_dir

    # ---------------------------------------------------------------- accelerator and run directory
    accelerator = open_accelerator(cfg, output_dir)
    is_main = accelerator.is_main_process
    run_lock = claim_run_dir(output_dir, resume, overwrite, accelerator)  # held until the process ends
    start.claimed(is_main)
    setup_logging(output_dir, is_main)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every process
    checkpoint_path = find_resume_checkpoint(output_dir, resume, cfg, accelerator.num_processes, accept_changed_batch)

    # ---------------------------------------------------------------- data
    train_dataset, val_source, failure_log = open_data(cfg, output_dir, is_main)

    # ---------------------------------------------------------------- models, losses, optimisers; resume
    vae = build_trainable_vae(cfg.model)
    # Fine-tuning an existing VAE: keep its starting weights to report how far the latents moved.
    initial_vae = copy.deepcopy(vae).eval().requires_grad_(False) if cfg.model.pretrained else None
    state = build_state(cfg, vae, accelerator)
    run = open_run(cfg, state, accelerator, output_dir, checkpoint_path, train_dataset, val_source)
    step, cfg_dict, val_loader, preview = run.step, run.cfg_dict, run.val_loader, run.preview
    images_per_step, initial_val_metrics = run.images_per_step, run.initial_val_metrics

    # ---------------------------------------------------------------- training loop
    if val_loader is not None and step == 0:
        initial_val_metrics = validate(state.autoencoder.vae, val_loader, accelerator, step,
                                       cfg.logging.diffusability)
    start.training()  # from here on the folder holds a run, whatever happens
    outcome = run_steps(
        state, cfg, cfg_dict, accelerator, run.loader, failure_log, output_dir / "checkpoints", step,
        run.skipped_steps, resumed=checkpoint_path is not None, images_per_step=images_per_step,
        initial_val_metrics=initial_val_metrics,
        show_images=lambda at: log_preview(preview, state.inference_model(), accelerator, output_dir, at),
        validate_now=None if val_loader is None else lambda at: validate(state.inference_model(), val_loader,
                                                                         accelerator, at, cfg.logging.diffusability))
    step, stopped_early, val_metrics = outcome.step, outcome.stopped_early, outcome.val_metrics

    # ---------------------------------------------------------------- latent drift and export
    drift, model_dir = None, None
    if initial_vae is not None and val_loader is not None and not stopped_early:
        drift = report_latent_drift(initial_vae, state.inference_model(), val_loader, accelerator, cfg, step)
    if not stopped_early:
        model_dir = export_model(cfg, cfg_dict, state.inference_model(cfg.train.export_ema), train_dataset,
                                 accelerator, output_dir, step, val_metrics, drift)
    accelerator.end_training()
    summary = RunSummary(output_dir, step, step * images_per_step, outcome.skipped_steps, len(failure_log.seen),
                         val_metrics, initial_val_metrics, stopped_early, model_dir, outcome.step_seconds, drift)
    if is_main:
        write_summary(summary)
    if run_lock is not None:
        run_lock.close()  # the run folder is free for the next writer
    return summary


def open_accelerator(cfg: Config, output_dir: Path):
    """The Accelerator of a run into ``output_dir`` (checked writable, trackers and a Hub login checked
    before anything runs), its precision checked, CPU threads set and, on CUDA, the convolution and
    TF32 settings made."""
    check_trackers(cfg.logging.trackers)
    if cfg.export.push_to_hub:
        hub_api()  # a missing Hub login stops the run now, not after training
    check_writable(output_dir)
    accelerator = make_accelerator(
        mixed_precision=cfg.train.mixed_precision, log_with=cfg.logging.trackers or None,
        project_dir=str(output_dir / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    device = accelerator.device
    configure_cpu_threads(device, cfg.data.num_workers)
    if cfg.train.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.mixed_precision=fp16 needs a CUDA GPU (this run is on {device.type}, where it would "
                          "silently train in fp32); use train.mixed_precision=bf16 or no")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed-size crops: pick the fastest convolution once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    return accelerator


def open_data(cfg: Config, output_dir: Path, is_main: bool) -> Tuple[Any, Optional[Any], FailureLog]:
    """The training dataset (map-style or a stream of shards), the validation source (or None) and the
    log of unreadable inputs."""
    train_dataset, val_source, failures = training_data(cfg.data)
    failure_log = FailureLog(output_dir / "skipped_inputs.txt", is_main)
    failure_log.add(failures)
    logger.info("data: %s, %d validation images", train_dataset.describe(),
                0 if val_source is None else len(val_source))
    return train_dataset, val_source, failure_log


@dataclass
class OpenedRun:
    step: int
    skipped_steps: int
    initial_val_metrics: Dict[str, float]
    cfg_dict: Dict
    images_per_step: int
    loader: Any
    val_loader: Any
    preview: torch.Tensor


def open_run(cfg: Config, state: TrainState, accelerator, output_dir: Path, checkpoint_path: Optional[Path],
             train_dataset, val_source) -> OpenedRun:
    """Restore ``checkpoint_path`` (if any) into ``state``, save the resolved config, and open the loaders from
    the step reached (a stream from its saved position), the preview images and the trackers."""
    step, skipped_steps, initial_val_metrics = 0, 0, {}
    if checkpoint_path is not None:  # the metrics of the model before training are the run's, kept across resumes
        step, skipped_steps, initial_val_metrics = restore_checkpoint(checkpoint_path, state, accelerator)
        logger.info("resumed from %s at step %d", checkpoint_path, step)
    cfg_dict = config_to_dict(cfg)  # after set-up: a disabled perceptual loss is saved as weight 0
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
    images_per_step = cfg.train.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes
    loader = train_loader(train_dataset, cfg, accelerator, start_step=step, checkpoint_path=checkpoint_path)
    val_loader = validation_loader(val_source, cfg, accelerator) if val_source is not None else None
    preview = preview_batch(val_loader, train_dataset, accelerator)
    if cfg.logging.trackers:
        accelerator.init_trackers(cfg.logging.project, config=flat_hparams(cfg_dict))
    return OpenedRun(step, skipped_steps, initial_val_metrics, cfg_dict, images_per_step, loader, val_loader, preview)


@dataclass
class LoopOutcome:
    step: int
    skipped_steps: int
    stopped_early: bool
    val_metrics: Dict[str, float]
    step_seconds: List[float]


def run_steps(state: TrainState, cfg: Config, cfg_dict: Dict, accelerator, loader, failure_log: FailureLog,
              checkpoint_root: Path, step: int, skipped_steps: int, resumed: bool, images_per_step: int,
              show_images: Callable[[int], None], validate_now: Optional[Callable[[int], Dict[str, float]]],
              initial_val_metrics: Optional[Dict[str, float]] = None, desc: str = "train") -> LoopOutcome:
    """The loop from ``step`` to ``train.max_steps`` (``train`` and ``distill`` share it): every step is
    ``train_step``, followed by what falls due at that step — logging, ``show_images(step)``,
    ``validate_now(step)``, a checkpoint, a stop — and a final checkpoint unless the last step has one.
    ``initial_val_metrics`` (the model's before training) travel in every checkpoint."""
    is_main, initial_val_metrics = accelerator.is_main_process, initial_val_metrics or {}
    guard = StepGuard(cfg, state.scaler, skipped_steps, accelerator.device, StopRequest(cfg.train.time_limit_minutes))
    data = iter(loader)  # here, as before: starting a DataLoader draws from the RNG that checkpoints save
    log = TrainingLog(accelerator, cfg, step, images_per_step, desc)
    accum, val_metrics = cfg.train.grad_accum_steps, {}
    last_saved = step if resumed else -1
    start_time, start_step, stopped_early = time.time(), step, False
    try:
        while step < cfg.train.max_steps:
            batches = [next(data) for _ in range(accum)]
            for batch in batches:
                failure_log.add(batch["failures"])
            out = train_step(state, batches, step, guard, log.metrics, accelerator, cfg)
            step += 1
            log.step_done()

            if is_main:  # the verdict is shared: one warning, not one per process
                guard.log_skipped(step)
            if guard.exhausted:
                # Skipped steps changed nothing, so these weights are those from before the first bad step.
                save_checkpoint(checkpoint_root, state, step, guard.skipped_steps, accelerator, cfg_dict,
                                initial_val_metrics, loader)
                raise guard.error(step)
            final = step == cfg.train.max_steps
            if step % cfg.logging.log_every == 0 or final:
                log.write(step, out.ae_grad_norm, out.d_grad_norm, state.sched_ae.get_last_lr()[0], guard.skipped_steps)
            if step % cfg.logging.image_every == 0 or final:
                show_images(step)
            if validate_now is not None and (step % cfg.train.val_every == 0 or final):
                val_metrics = validate_now(step)
            if step % cfg.train.checkpoint_every == 0:
                save_checkpoint(checkpoint_root, state, step, guard.skipped_steps, accelerator, cfg_dict,
                                initial_val_metrics, loader)
                last_saved = step
            if guard.stop_requested and not final:
                if is_main:
                    logger.warning("stop requested (signal or time limit) at step %d: writing a checkpoint and "
                                   "exiting; continue with --resume latest", step)
                stopped_early = True
                break
    finally:
        log.close()
        guard.stop.restore()

    if last_saved != step:
        save_checkpoint(checkpoint_root, state, step, guard.skipped_steps, accelerator, cfg_dict,
                        initial_val_metrics, loader)
    failure_log.gather()
    elapsed = time.time() - start_time
    logger.info("%s: %d steps in %.0fs (%.2f steps/s); %d steps skipped, %d inputs unreadable", desc,
                step - start_step, elapsed, (step - start_step) / max(elapsed, 1e-9), guard.skipped_steps,
                len(failure_log.seen))
    return LoopOutcome(step, guard.skipped_steps, stopped_early, val_metrics, log.step_seconds)
