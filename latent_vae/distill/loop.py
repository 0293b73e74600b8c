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

from ..config import Config
from ..data.images import image_grid
from ..interop.export import save_diffusers_model
from ..train.loop import open_accelerator, open_data, run_steps, open_run
from ..train.monitor import setup_logging
from ..train.run_io import RunStart, RunSummary, claim_run_dir, find_resume_checkpoint, write_summary
from ..train.state import TrainState, assemble_state
from ..train.validation import log_grid
from .card import write_distill_card
from .measure import distillation_quality, throughput
from .student import DistillStudent, Teacher, build_student, describe, load_teacher, trained_parts

logger = logging.getLogger("latent_vae")

# What a distillation checkpoint holds: the same teacher, student architecture and trained parts.
DISTILL_IDENTITY = {"distill": ("teacher", "teacher_subfolder", "student", "student_config", "parts")}


def distill(config: Config, output_dir: str | Path, resume: Optional[str] = None,
            overwrite: bool = False) -> RunSummary:
    """A start that fails before its first step takes back what it added to the run folder
    (``train.run_io.RunStart``), as ``train`` does."""
    with RunStart(Path(output_dir).resolve()) as start:
        return _distill(config, start, resume, overwrite)


def _distill(cfg: Config, start: RunStart, resume: Optional[str], overwrite: bool) -> RunSummary:
    output_dir = start.output_dir

    # ---------------------------------------------------------------- teacher, student, accelerator, run directory
    # Teacher and student first: a bad teacher or student is refused before the run folder is made.
    teacher = load_teacher(cfg.distill.teacher, cfg.distill.teacher_subfolder, cfg.distill.teacher_latents)
    torch.manual_seed(cfg.train.seed)  # the same initial student on every process
    student = build_student(cfg.distill, teacher)  # a student that cannot serve the teacher is refused up front
    accelerator = open_accelerator(cfg, output_dir)
    is_main = accelerator.is_main_process
    run_lock = claim_run_dir(output_dir, resume, overwrite, accelerator)
    start.claimed(is_main)
    setup_logging(output_dir, is_main)
    checkpoint_path = find_resume_checkpoint(output_dir, resume, cfg, accelerator.num_processes,
                                             identity=DISTILL_IDENTITY)
    if cfg.distill.parts == "encoder":
        # The decoder is frozen: only the encoder's latent MSE is trained; image terms would have no gradient.
        cfg.reconstruction.pixel_weight = cfg.reconstruction.perceptual_weight = cfg.gan.weight = 0.0
        logger.info("distill.parts=encoder: reconstruction, LPIPS and GAN terms are off (only the latent MSE trains)")

    # ---------------------------------------------------------------- data
    train_dataset, val_source, failure_log = open_data(cfg, output_dir, is_main)

    # ---------------------------------------------------------------- state, resume
    teacher.to(accelerator.device)
    model = DistillStudent(student, teacher, cfg.distill, cfg.reconstruction)
    logger.info("teacher: %s (%s latent channels; the student learns the scaled latents %s); student %s: %s; "
                "training %s", cfg.distill.teacher, teacher.vae.config.latent_channels, teacher.convention(),
                cfg.distill.student, describe(student), " and ".join(trained_parts(cfg.distill.parts)))
    state = assemble_state(cfg, model, accelerator, f"student of {cfg.distill.teacher}")
    run = open_run(cfg, state, accelerator, output_dir, checkpoint_path, train_dataset, val_source)
    step, cfg_dict, val_loader, preview = run.step, run.cfg_dict, run.val_loader, run.preview
    images_per_step, initial_val_metrics = run.images_per_step, run.initial_val_metrics

    # ---------------------------------------------------------------- the loop (train's)
    if val_loader is not None and step == 0:
        initial_val_metrics = validate_distill(state.autoencoder.vae, teacher, val_loader, accelerator, step)
    start.training()  # from here on the folder holds a run, whatever happens
    outcome = run_steps(
        state, cfg, cfg_dict, accelerator, run.loader, failure_log, output_dir / "checkpoints", step,
        run.skipped_steps, resumed=checkpoint_path is not None, images_per_step=images_per_step, desc="distill",
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
