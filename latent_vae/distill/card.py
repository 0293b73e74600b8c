"""The model card of a distilled student: teacher, latent convention, what was trained, measured quality
and speed, and how to use it in the teacher's pipelines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

from diffusers import AutoencoderTiny

from ..data.sources import SAMPLE_PHOTOS_NAME
from ..interop.export import public_name
from ..runtime import atomic_write
from .measure import QUALITY_KEYS
from .student import Teacher, describe, trained_parts

QUALITY_TEXT = {
    "psnr_student": "PSNR (dB) of the student's decode of the teacher's latents, against the image",
    "psnr_teacher": "PSNR (dB) of the teacher's own decode of the same latents, against the image",
    "psnr_student_vs_teacher": "PSNR (dB) of the student's decode against the teacher's decode",
    "psnr_student_roundtrip": "PSNR (dB) of the student's encoder then decoder, against the image",
    "encoder_relative_error": "‖student latents − teacher scaled latents‖ / ‖teacher scaled latents‖",
}


def write_distill_card(folder: Path, student: AutoencoderTiny, teacher: Teacher, recipe: Dict, steps: int,
                       metrics: Dict[str, float], speed: Dict[str, float], resolution: int, device: str) -> None:
    distill, data = recipe["distill"], recipe["data"]
    # Hub ids as they are, local paths by their last component: a public card does not name the user's machine.
    teacher_public = public_name(distill["teacher"])
    teacher_name = teacher_public + (f" (subfolder `{distill['teacher_subfolder']}`)"
                                     if distill.get("teacher_subfolder") else "")
    parts = trained_parts(distill["parts"])
    untrained = [p for p in ("encoder", "decoder") if p not in parts]
    lines = [
        "# AutoencoderTiny distilled from " + teacher_public,
        "",
        "A stock `diffusers.AutoencoderTiny` (TAESD architecture) trained with latent_vae to share the latent "
        "space of its teacher: load it with plain diffusers, no custom code, and put it in the teacher's pipeline.",
        "",
        "```python",
        "from diffusers import AutoencoderTiny",
        f'pipe.vae = AutoencoderTiny.from_pretrained("{folder.name}")  # pipe: a pipeline built on the teacher',
        "```",
        "",
        "## Latent convention",
        "",
        f"- teacher: `{teacher_name}`, {type(teacher.vae).__name__}, {teacher.vae.config.latent_channels} "
        "latent channels",
        f"- the student's latents are the teacher pipeline's *scaled* latents, {teacher.convention()}, with z the "
        "teacher's posterior latents: what the diffusion model denoises",
        "- the student's own `scaling_factor` is 1.0 and `shift_factor` 0.0, so the pipeline passes those scaled "
        "latents through unchanged (`latent_magnitude`/`latent_shift` only pack latents into [0, 1] for storage)",
        "",
        "## Model",
        "",
        f"- {describe(student)}",
        f"- trained: {' and '.join(parts)}"
        + (f"; the {untrained[0]} was NOT trained (random weights): do not use "
           f"`{'encode' if untrained[0] == 'encoder' else 'decode'}` of this model" if untrained else ""),
        f"- steps: {steps}, data: `{public_name(data.get('path')) or SAMPLE_PHOTOS_NAME}` at {data['resolution']} px",
        f"- written: {time.strftime('%Y-%m-%d %H:%M')}; the full resolved recipe is `../config.yaml`",
        "",
        "## Measured quality (validation images)",
        "",
    ]
    shown = [k for k in QUALITY_KEYS if k in metrics]
    if shown:
        lines += ["| figure | value | meaning |", "| --- | --- | --- |"]
        lines += [f"| {k} | {metrics[k]:.4f} | {QUALITY_TEXT[k]} |" for k in shown]
    else:
        lines.append("No validation set was used.")
    lines += ["", "## Measured speed", ""]
    if speed:
        lines += [f"Images per second on {device}, batch of {resolution}x{resolution} images, "
                  "same batch for both models, median of 3 runs after a warm-up:", "",
                  "| | teacher | student | student speed-up |", "| --- | --- | --- | --- |"]
        for part in ("encode", "decode"):
            lines.append(f"| {part} | {speed[f'teacher_{part}_images_per_s']:.1f} | "
                         f"{speed[f'student_{part}_images_per_s']:.1f} | {speed[f'{part}_speedup']:.1f}x |")
    else:
        lines.append("Not measured (distill.benchmark_images=0).")
    atomic_write(folder / "README.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
