"""The training run for KL and VQ autoencoders on Accelerate.

``train()`` reads top to bottom: run directory and Accelerator, data, the ``TrainState``
(models, losses, optimisers; ``state.py``), resume, then the loop — every step is
``train_step`` (``step.py``: the generator update, then the discriminator update on the same
detached reconstructions), followed by what falls due at that step: logging, previews,
validation, a checkpoint, a stop — and finally the export of a stock diffusers model folder.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from accelerate.utils import DistributedDataParallelKwargs

from ..config import Config, config_to_dict, save_config
from ..data.datasets import TrainDataset
from ..data.sources import split_train_val
from ..distributed import make_accelerator
from ..errors import ConfigError
from .guard import StepGuard, StopRequest
from .monitor import FailureLog, TrainingLog, flat_hparams, setup_logging
from .run_io import (
    RunSummary,
    check_writable,
    claim_run_dir,
    export_model,
    find_resume_checkpoint,
    log_preview,
    preview_batch,
    report_latent_drift,
    restore_checkpoint,
    save_checkpoint,
    train_loader,
    validate,
    validation_loader,
    write_summary,
)
from .state import build_state
from .step import train_step
from .trainable import build_trainable_vae

logger = logging.getLogger("latent_vae")


def train(config: Config, output_dir: str | Path, resume: Optional[str] = None, overwrite: bool = False) -> RunSummary:
    cfg, output_dir = config, Path(output_dir).resolve()

    # ---------------------------------------------------------------- accelerator and run directory
    check_writable(output_dir)
    accelerator = make_accelerator(
        mixed_precision=cfg.train.mixed_precision, log_with=cfg.logging.trackers or None,
        project_dir=str(output_dir / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    is_main, device = accelerator.is_main_process, accelerator.device
    if cfg.train.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.mixed_precision=fp16 needs a CUDA GPU (this run is on {device.type}, where it would "
                          "silently train in fp32); use train.mixed_precision=bf16 or no")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed-size crops: pick the fastest convolution once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    run_lock = claim_run_dir(output_dir, resume, overwrite, accelerator)  # held until the process ends
    setup_logging(output_dir, is_main)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every process
    checkpoint_path = find_resume_checkpoint(output_dir, resume, cfg)

    # ---------------------------------------------------------------- data
    train_source, val_source, failures = split_train_val(cfg.data)
    failure_log = FailureLog(output_dir / "skipped_inputs.txt", is_main)
    failure_log.add(failures)
    train_dataset = TrainDataset(train_source, cfg.data)
    logger.info("data: %d training images from %s, %d validation images", len(train_source),
                train_source.name, 0 if val_source is None else len(val_source))

    # ---------------------------------------------------------------- models, losses, optimisers; resume
    vae = build_trainable_vae(cfg.model)
    # Fine-tuning an existing VAE: keep its starting weights to report how far the latents moved.
    initial_vae = copy.deepcopy(vae).eval().requires_grad_(False) if cfg.model.pretrained else None
    state = build_state(cfg, vae, accelerator)
    step, skipped_steps = 0, 0
    if checkpoint_path is not None:
        step, skipped_steps = restore_checkpoint(checkpoint_path, state, accelerator)
        logger.info("resumed from %s at step %d", checkpoint_path, step)
    cfg_dict = config_to_dict(cfg)  # after set-up: a disabled perceptual loss is saved as weight 0
    if is_main:
        save_config(cfg, output_dir / "config.yaml")

    accum = cfg.train.grad_accum_steps
    images_per_step = cfg.train.batch_size * accum * accelerator.num_processes
    loader = train_loader(train_dataset, cfg, accelerator, start_step=step)
    val_loader = validation_loader(val_source, cfg, accelerator) if val_source is not None else None
    preview = preview_batch(val_loader, train_dataset, device)
    if cfg.logging.trackers:
        accelerator.init_trackers(cfg.logging.project, config=flat_hparams(cfg_dict))
    checkpoint_root = output_dir / "checkpoints"

    # ---------------------------------------------------------------- training loop
    initial_val_metrics: Dict[str, float] = {}
    if val_loader is not None and step == 0:
        initial_val_metrics = validate(state.autoencoder.vae, val_loader, accelerator, step,
                                       cfg.logging.diffusability)
    guard = StepGuard(cfg, state.scaler, skipped_steps, device, StopRequest(cfg.train.time_limit_minutes))
    data = iter(loader)  # here, as before: starting a DataLoader draws from the RNG that checkpoints save
    log = TrainingLog(accelerator, cfg, step, images_per_step)
    val_metrics: Dict[str, float] = {}
    last_saved = step if checkpoint_path is not None else -1
    start_time, start_step, stopped_early = time.time(), step, False
    try:
        while step < cfg.train.max_steps:
            batches = [next(data) for _ in range(accum)]
            for batch in batches:
                failure_log.add(batch["failures"])
            out = train_step(state, batches, step, guard, log.metrics, accelerator, cfg)
            step += 1
            log.step_done()

            guard.log_skipped(step)
            if guard.exhausted:
                # Skipped steps changed nothing, so these weights are those from before the first bad step.
                save_checkpoint(checkpoint_root, state, step, guard.skipped_steps, accelerator, cfg_dict)
                raise guard.error(step)
            final = step == cfg.train.max_steps
            if step % cfg.logging.log_every == 0 or final:
                log.write(step, out.ae_grad_norm, out.d_grad_norm, state.sched_ae.get_last_lr()[0], guard.skipped_steps)
            if step % cfg.logging.image_every == 0 or final:
                log_preview(preview, state.inference_model(), accelerator, output_dir, step)
            if val_loader is not None and (step % cfg.train.val_every == 0 or final):
                val_metrics = validate(state.inference_model(), val_loader, accelerator, step, cfg.logging.diffusability)
            if step % cfg.train.checkpoint_every == 0:
                save_checkpoint(checkpoint_root, state, step, guard.skipped_steps, accelerator, cfg_dict)
                last_saved = step
            if guard.stop_requested and not final:
                logger.warning("stop requested (signal or time limit) at step %d: writing a checkpoint and exiting; "
                               "continue with --resume latest", step)
                stopped_early = True
                break
    finally:
        log.close()
        guard.stop.restore()

    if last_saved != step:
        save_checkpoint(checkpoint_root, state, step, guard.skipped_steps, accelerator, cfg_dict)
    elapsed = time.time() - start_time
    logger.info("trained %d steps in %.0fs (%.2f steps/s); %d steps skipped, %d inputs unreadable",
                step - start_step, elapsed, (step - start_step) / max(elapsed, 1e-9), guard.skipped_steps,
                len(failure_log.seen))

    # ---------------------------------------------------------------- latent drift and export
    drift, model_dir = None, None
    if initial_vae is not None and val_loader is not None and not stopped_early:
        drift = report_latent_drift(initial_vae, state.inference_model(), val_loader, accelerator, cfg, step)
    if not stopped_early:
        model_dir = export_model(cfg, cfg_dict, state.inference_model(cfg.train.export_ema), train_dataset,
                                 accelerator, output_dir, step, val_metrics, drift)
    accelerator.end_training()
    summary = RunSummary(output_dir, step, step * images_per_step, guard.skipped_steps, len(failure_log.seen),
                         val_metrics, initial_val_metrics, stopped_early, model_dir, log.step_seconds, drift)
    if is_main:
        write_summary(summary)
    if run_lock is not None:
        run_lock.close()  # the run folder is free for the next writer
    return summary
