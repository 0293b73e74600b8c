"""What the model card and the benchmark report: how well the student reproduces the teacher, and how
much faster it is.

Quality, on images in [−1, 1] (PSNR per image on [0, 1], ``evaluate.metrics``): the student's decoder
on the teacher's scaled latents (posterior mean) against the image, the teacher's own decode of the
same latents against the image, the student's decode against the teacher's, and the student
encoder's relative error ‖E_s(x) − t(x)‖ / ‖t(x)‖ on the scaled latents.

Speed: encode and decode throughput (images/s) of teacher and student on the same batch, same device
and dtype, after warm-up; on CUDA every timing ends with a synchronisation.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, Optional

import torch
from diffusers import AutoencoderTiny

from ..distributed import all_reduce_sum_
from ..evaluate.metrics import psnr_per_image
from .student import Teacher

QUALITY_KEYS = ("psnr_student", "psnr_teacher", "psnr_student_vs_teacher", "psnr_student_roundtrip",
                "encoder_relative_error")


@torch.no_grad()
def distillation_quality(student: AutoencoderTiny, teacher: Teacher, batches: Iterable[torch.Tensor],
                         device: torch.device, lpips: Optional[Callable] = None) -> Dict[str, float]:
    """The quality figures above, means over all images of ``batches`` and over all processes
    (a collective: every process calls it). ``lpips``: a network scoring (x, y) per image, for
    ``lpips_student`` / ``lpips_teacher``."""
    was_training = student.training
    student.eval()
    names = [*QUALITY_KEYS[:4], "lpips_student", "lpips_teacher"]
    sums = torch.zeros(len(names) + 3, dtype=torch.float64, device=device)  # + latent error², latent norm², images
    for images in batches:
        images = images.to(device)
        target = teacher.scaled_latents(images)
        student_image = student.decode(target).sample.float()
        teacher_image = teacher.decode_scaled(target).float()
        latents = student.encode(images).latents.float()
        roundtrip = student.decode(latents).sample.float()
        values = [psnr_per_image(student_image, images).sum(), psnr_per_image(teacher_image, images).sum(),
                  psnr_per_image(student_image, teacher_image).sum(), psnr_per_image(roundtrip, images).sum()]
        if lpips is not None:
            values += [lpips(images, student_image).sum(), lpips(images, teacher_image).sum()]
        else:
            values += [torch.zeros((), device=device)] * 2
        values += [(latents - target.float()).pow(2).sum(), target.float().pow(2).sum(),
                   torch.tensor(float(len(images)), device=device)]
        sums += torch.stack([v.double() for v in values])
    student.train(was_training)
    all_reduce_sum_(sums)
    count = max(float(sums[-1]), 1.0)
    result = {name: float(sums[i]) / count for i, name in enumerate(names)}
    if lpips is None:
        del result["lpips_student"], result["lpips_teacher"]
    result["encoder_relative_error"] = float((sums[-3] / sums[-2].clamp(min=1e-30)).sqrt())
    return result


def _seconds(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def throughput(student: AutoencoderTiny, teacher: Teacher, images: torch.Tensor, repeats: int = 3
               ) -> Dict[str, float]:
    """Images per second of ``encode`` and ``decode`` for teacher and student on ``images`` (one batch,
    on its device and dtype), and the student's speed-up over the teacher for each."""
    device = images.device
    teacher_latents = teacher.scaled_latents(images)
    result = {
        "teacher_encode": _seconds(lambda: teacher.scaled_latents(images), device, repeats),
        "student_encode": _seconds(lambda: student.encode(images).latents, device, repeats),
        "teacher_decode": _seconds(lambda: teacher.decode_scaled(teacher_latents), device, repeats),
        "student_decode": _seconds(lambda: student.decode(teacher_latents).sample, device, repeats),
    }
    rates = {f"{name}_images_per_s": len(images) / seconds for name, seconds in result.items()}
    for part in ("encode", "decode"):
        rates[f"{part}_speedup"] = result[f"teacher_{part}"] / result[f"student_{part}"]
    return rates
