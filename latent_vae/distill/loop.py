"""The distillation run: ``train``'s machinery around a student and a frozen teacher.

``distill()`` reads top to bottom like ``train.loop.train``, and uses the same parts: the run-folder
lock, the Accelerator, the resumable data stream, ``TrainState`` (built by ``train.state.assemble_state``
around ``DistillStudent``: discriminator, loss module, EMA, Adam, schedules, scaler, DDP), the loop
(``train.loop.run_steps``: every step ``train.step.train_step``, G update then D update, the NaN/stop
verdict shared by all processes; logging, checkpoints), the checkpoint format and exact resume, the
progress bar and tracker scalars. What differs is what a
step computes (``student.py``), the validation figures and preview grids (input | teacher | student,
side by side), and the export: a stock ``AutoencoderTiny`` folder whose model card states the teacher,
the latent convention, and the measured quality and speed (``card.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import torch
from accelerate.utils import DistributedDataParallelKwargs

from ..config import Config, config_to_dict, save_config
from ..data.datasets import TrainDataset
from ..data.images import image_grid
from ..data.sources import split_train_val
from ..distributed import make_accelerator
from ..errors import ConfigError
from ..interop.export import save_diffusers_model
from ..train.loop import run_steps
from ..train.monitor import FailureLog, flat_hparams, setup_logging
from ..train.run_io import (
    RunSummary,
    check_writable,
    claim_run_dir,
    find_resume_checkpoint,
    log_grid,
    preview_batch,
    restore_checkpoint,
    train_loader,
    validation_loader,
    write_summary,
)
from ..train.state import TrainState, assemble_state
from .card import write_distill_card
from .measure import distillation_quality, throughput
from .student import DistillStudent, Teacher, build_student, describe, load_teacher, trained_parts

logger = logging.getLogger("latent_vae")

# What a distillation checkpoint holds: the same teacher, student architecture and trained parts.
DISTILL_IDENTITY = {"distill": ("teacher", "teacher_subfolder", "student", "student_config", "parts")}


def distill(config: Config, output_dir: str | Path, resume: Optional[str] = None,
            overwrite: bool = False) -> RunSummary:
    cfg, output_dir = config, Path(output_dir).resolve()

    # ---------------------------------------------------------------- accelerator, run directory, teacher
    check_writable(output_dir)
    accelerator = make_accelerator(
        mixed_precision=cfg.train.mixed_precision, log_with=cfg.logging.trackers or None,
        project_dir=str(output_dir / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    is_main, device = accelerator.is_main_process, accelerator.device
    if cfg.train.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.mixed_precision=fp16 needs a CUDA GPU (this run is on {device.type}); "
                          "use train.mixed_precision=bf16 or no")
    teacher = load_teacher(cfg.distill.teacher, cfg.distill.teacher_subfolder, cfg.distill.teacher_latents)
    torch.manual_seed(cfg.train.seed)  # the same initial student on every process
    student = build_student(cfg.distill, teacher)  # a student that cannot serve the teacher is refused up front
    run_lock = claim_run_dir(output_dir, resume, overwrite, accelerator)
    setup_logging(output_dir, is_main)
    checkpoint_path = find_resume_checkpoint(output_dir, resume, cfg, accelerator.num_processes,
                                             identity=DISTILL_IDENTITY)
    if cfg.distill.parts == "encoder":
        # The decoder is frozen: only the encoder's latent MSE is trained; image terms would have no gradient.
        cfg.reconstruction.pixel_weight = cfg.reconstruction.perceptual_weight = cfg.gan.weight = 0.0
        logger.info("distill.parts=encoder: reconstruction, LPIPS and GAN terms are off (only the latent MSE trains)")

    # ---------------------------------------------------------------- data
    train_source, val_source, failures = split_train_val(cfg.data)
    failure_log = FailureLog(output_dir / "skipped_inputs.txt", is_main)
    failure_log.add(failures)
    train_dataset = TrainDataset(train_source, cfg.data)
    logger.info("data: %d training images from %s, %d validation images", len(train_source),
                train_source.name, 0 if val_source is None else len(val_source))

    # ---------------------------------------------------------------- state, resume
    teacher.to(device)
    model = DistillStudent(student, teacher, cfg.distill, cfg.reconstruction)
    logger.info("teacher: %s (%s latent channels; the student learns the scaled latents %s); student %s: %s; "
                "training %s", cfg.distill.teacher, teacher.vae.config.latent_channels, teacher.convention(),
                cfg.distill.student, describe(student), " and ".join(trained_parts(cfg.distill.parts)))
    state = assemble_state(cfg, model, accelerator, f"student of {cfg.distill.teacher}")
    step, skipped_steps, initial_val_metrics = 0, 0, {}
    if checkpoint_path is not None:
        step, skipped_steps, initial_val_metrics = restore_checkpoint(checkpoint_path, state, accelerator)
        logger.info("resumed from %s at step %d", checkpoint_path, step)
    cfg_dict = config_to_dict(cfg)
    if is_main:
        save_config(cfg, output_dir / "config.yaml")

    accum = cfg.train.grad_accum_steps
    images_per_step = cfg.train.batch_size * accum * accelerator.num_processes
    loader = train_loader(train_dataset, cfg, accelerator, start_step=step)
    val_loader = validation_loader(val_source, cfg, accelerator) if val_source is not None else None
    preview = preview_batch(val_loader, train_dataset, accelerator)
    if cfg.logging.trackers:
        accelerator.init_trackers(cfg.logging.project, config=flat_hparams(cfg_dict))

    # ---------------------------------------------------------------- the loop (train's)
    if val_loader is not None and step == 0:
        initial_val_metrics = validate_distill(state.autoencoder.vae, teacher, val_loader, accelerator, step)
    outcome = run_steps(
        state, cfg, cfg_dict, accelerator, loader, failure_log, output_dir / "checkpoints", step, skipped_steps,
        resumed=checkpoint_path is not None, images_per_step=images_per_step, desc="distill",
        initial_val_metrics=initial_val_metrics,
        show_images=lambda at: log_distill_preview(preview, state.inference_model(), teacher, accelerator,
                                                   output_dir, at),
        validate_now=None if val_loader is None else lambda at: validate_distill(state.inference_model(), teacher,
                                                                                 val_loader, accelerator, at))
    step, val_metrics = outcome.step, outcome.val_metrics

    model_dir = None
    if not outcome.stopped_early:
        model_dir = export_student(cfg, cfg_dict, state, teacher, preview, accelerator, output_dir, step, val_metrics)
    accelerator.end_training()
    summary = RunSummary(output_dir, step, step * images_per_step, outcome.skipped_steps, len(failure_log.seen),
                         val_metrics, initial_val_metrics, outcome.stopped_early, model_dir, outcome.step_seconds)
    if is_main:
        write_summary(summary)
    if run_lock is not None:
        run_lock.close()
    return summary


# --------------------------------------------------------------------------- what a run shows


@torch.no_grad()
def log_distill_preview(preview: torch.Tensor, student, teacher: Teacher, accelerator, output_dir: Path,
                        step: int) -> None:
    """One row per image: input | teacher's decode | student's decode of the teacher's latents | the
    student's own round trip (encoder and decoder): ``samples/distill-<step>.png`` and the trackers."""
    if not accelerator.is_main_process:
        return
    was_training = student.training
    student.eval()
    with accelerator.autocast():
        target = teacher.scaled_latents(preview)
        panels = [preview, teacher.decode_scaled(target), student.decode(target).sample,
                  student.decode(student.encode(preview).latents).sample]
    student.train(was_training)
    rows = torch.stack([p.float() for p in panels], dim=1).flatten(0, 1)  # image-major: panels side by side
    log_grid(image_grid(rows, columns=len(panels)), "distill", accelerator, output_dir, step)


def validate_distill(student, teacher: Teacher, loader, accelerator, step: int) -> Dict[str, float]:
    """``measure.distillation_quality`` over the validation set (all processes), logged as ``val/<name>``."""
    batches = (b["pixel_values"] for b in loader if b["pixel_values"] is not None)
    with accelerator.autocast():
        metrics = distillation_quality(student, teacher, batches, accelerator.device)
    accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    logger.info("step %d validation: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def export_student(cfg: Config, cfg_dict: Dict, state: TrainState, teacher: Teacher, preview: torch.Tensor,
                   accelerator, output_dir: Path, step: int, val_metrics: Dict[str, float]) -> Path:
    """``<output>/model``: the (EMA) student as a stock ``AutoencoderTiny`` folder with its model card."""
    model_dir = output_dir / "model"
    if accelerator.is_main_process:
        student = state.inference_model(cfg.train.export_ema).eval()
        count = min(cfg.distill.benchmark_images, len(preview))
        speed = throughput(student, teacher, preview[:count]) if count else {}
        save_diffusers_model(student, model_dir)
        write_distill_card(model_dir, student, teacher, cfg_dict, step, val_metrics, speed, preview.shape[-1],
                           str(accelerator.device))
        logger.info("student exported to %s (diffusers AutoencoderTiny.from_pretrained); decode %.1fx, encode "
                    "%.1fx the teacher's speed", model_dir, speed.get("decode_speedup", float("nan")),
                    speed.get("encode_speedup", float("nan")))
    accelerator.wait_for_everyone()
    return model_dir
