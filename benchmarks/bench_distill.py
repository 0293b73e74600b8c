"""A distilled AutoencoderTiny against its teacher: speed, then reconstruction quality.

    python benchmarks/bench_distill.py
    python benchmarks/bench_distill.py --device cuda --resolutions 256,512,1024 --batch-size 8
    python benchmarks/bench_distill.py --teacher stabilityai/sd-vae-ft-ema --student-model runs/tiny/model \\
        --lpips-weights /path/vgg16-397923af.pth

Speed (the same work for both models, in one run): images/s of ``encode`` (teacher: posterior mean
scaled as its pipeline scales it; student: its encoder) and ``decode`` (both from the same scaled
latents) at each --resolutions, batch --batch-size, fp32, after --warmup untimed runs; median and
min–max of --repeats runs, and student/teacher. The teacher is --teacher, else the kl-f8 preset (the
Stable Diffusion VAE architecture: speed does not depend on the weights); the student is
--student-model, else the --student preset.

Quality: PSNR (and LPIPS-VGG when --lpips-weights is given; the backbone cannot be downloaded
offline) on held-out photographs (--eval-images, centre crops at --eval-resolution) of the teacher's
own decode and of the student's decode of the teacher's latents, the student against the teacher,
the student's full round trip, and the student encoder's relative latent error. Without a pretrained
--teacher (none is available offline here), a tiny-kl teacher is first trained for --teacher-steps on
--train-images with ``latent-vae train``, then the student is distilled for --distill-steps with
``latent-vae distill`` (configs/distill-taesd.yaml without GAN and LPIPS, at --train-resolution):
a stated, small budget, not a converged model.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import List

import common
import torch

from latent_vae.config import load_config
from latent_vae.data.sources import open_source
from latent_vae.distill.loop import distill
from latent_vae.distill.measure import distillation_quality
from latent_vae.distill.student import Teacher, build_student, load_teacher
from latent_vae.evaluate.dataset import eval_loader
from latent_vae.evaluate.options import EvalOptions
from latent_vae.models.loading import load_autoencoder
from latent_vae.presets import PRESETS
from latent_vae.train.loop import train

# The photographs next to the repository (../shared/data), found from wherever this checkout lives.
SHARED = next((p / "shared" / "data" for p in Path(__file__).resolve().parents if (p / "shared" / "data").is_dir()),
              Path("../shared/data"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolutions", default="256,512", help="comma-separated square sizes for the speed table")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher", help="AutoencoderKL folder or hub id (default: kl-f8 preset for speed; "
                        "a tiny-kl trained here for quality)")
    parser.add_argument("--teacher-subfolder")
    parser.add_argument("--student", default="taesd",
                        help="student preset timed (default: taesd, the published widths)")
    parser.add_argument("--distill-student", default="taesd-small",
                        help="student preset distilled for the quality table (default: taesd-small, for CPU budgets)")
    parser.add_argument("--student-model", help="an already distilled AutoencoderTiny folder: measure it instead")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--train-images", default=str(SHARED / "cbsd68"))
    parser.add_argument("--eval-images", default=str(SHARED / "mcmaster"))
    parser.add_argument("--train-resolution", type=int, default=64)
    parser.add_argument("--eval-resolution", type=int, default=128)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--lpips-weights", help="local torchvision VGG16 weights file: adds LPIPS-VGG")
    return parser.parse_args(argv)


def speed_table(args, device: torch.device) -> str:
    if args.teacher:
        teacher = load_teacher(args.teacher, args.teacher_subfolder, "mode")
    else:
        torch.manual_seed(0)
        teacher = Teacher(PRESETS["kl-f8"].cls(**PRESETS["kl-f8"].kwargs))
    config = load_config("distill-taesd", [f"distill.student={args.student}"])
    student = (load_autoencoder(args.student_model) if args.student_model else build_student(config.distill, teacher))
    teacher.to(device)
    student = student.to(device).eval()
    rows = []
    for resolution in [int(r) for r in args.resolutions.split(",") if r]:
        images = torch.rand(args.batch_size, 3, resolution, resolution, device=device) * 2 - 1
        with torch.no_grad():
            latents = teacher.scaled_latents(images)
            work = {
                "encode": (lambda: teacher.scaled_latents(images), lambda: student.encode(images).latents),
                "decode": (lambda: teacher.decode_scaled(latents), lambda: student.decode(latents).sample),
            }
            for part, (teacher_call, student_call) in work.items():
                print(f"timing {part} at {resolution}px", file=sys.stderr)
                per_image = [common.time_call(call, device, args.warmup, args.repeats).map(
                    lambda s: args.batch_size / s) for call in (teacher_call, student_call)]
                rows.append([f"{resolution}²", part, per_image[0].format(digits=2), per_image[1].format(digits=2),
                             f"{per_image[1].median / per_image[0].median:.1f}x"])
    params = [sum(p.numel() for p in m.parameters()) for m in (teacher.vae, student)]
    head = (f"teacher: {args.teacher or 'kl-f8 preset (SD VAE architecture)'}, {params[0] / 1e6:.1f}M parameters; "
            f"student: {args.student_model or args.student}, {params[1] / 1e6:.2f}M parameters; batch "
            f"{args.batch_size}, fp32, images/s median (min–max) of {args.repeats}")
    return head + "\n\n" + common.markdown_table(
        ["size", "work", "teacher images/s", "student images/s", "student / teacher"], rows)


def quality_table(args, device: torch.device, workdir: Path) -> str:
    notes: List[str] = []
    teacher_path = args.teacher
    if teacher_path is None:
        print(f"training the tiny-kl teacher for {args.teacher_steps} steps", file=sys.stderr)
        teacher_cfg = load_config(None, [
            f"data.path={args.train_images}", f"data.resolution={args.train_resolution}",
            f"data.resize={int(args.train_resolution * 1.5)}", "data.val_images=4", "data.num_workers=0",
            "reconstruction.pixel_loss=l2", "reconstruction.perceptual_weight=0", "gan.weight=0",
            "train.batch_size=8", "train.learning_rate=1e-3", "train.lr_scaling=none",
            f"train.max_steps={args.teacher_steps}", f"train.checkpoint_every={args.teacher_steps}",
            f"train.val_every={args.teacher_steps}", "logging.trackers=[]",
            f"logging.image_every={args.teacher_steps}"])
        teacher_path = str(train(teacher_cfg, workdir / "teacher", overwrite=True).model_dir)
        notes.append(f"teacher: tiny-kl (f8, 4 latent channels, 0.3M parameters) trained here for {args.teacher_steps} "
                     f"steps (batch 8, MSE, Adam 1e-3) on {args.train_images} at {args.train_resolution}px; no "
                     "pretrained VAE is available offline")
    student_path = args.student_model
    if student_path is None:
        print(f"distilling the {args.distill_student} student for {args.distill_steps} steps", file=sys.stderr)
        distill_cfg = load_config("distill-taesd", [
            f"distill.student={args.distill_student}", f"data.path={args.train_images}",
            f"data.resolution={args.train_resolution}", f"data.resize={int(args.train_resolution * 1.5)}",
            "data.val_images=4", "data.num_workers=0", "reconstruction.perceptual_weight=0", "gan.weight=0",
            "train.batch_size=8", f"train.max_steps={args.distill_steps}", f"train.val_every={args.distill_steps}",
            f"train.checkpoint_every={args.distill_steps}", "logging.trackers=[]", "distill.benchmark_images=0",
            f"logging.image_every={args.distill_steps}", "distill.teacher_latents=mode"])
        distill_cfg.distill.teacher = teacher_path
        distill_cfg.distill.teacher_subfolder = args.teacher_subfolder if args.teacher else None
        student_path = str(distill(distill_cfg, workdir / "student", overwrite=True).model_dir)
        notes.append(f"student: {args.distill_student} distilled for {args.distill_steps} steps with "
                     "configs/distill-taesd.yaml (Adam 3e-4, betas 0.9/0.9, amsgrad; batch 8 instead of 16; MSE "
                     f"only: no GAN, no LPIPS) at {args.train_resolution}px")
    teacher = load_teacher(teacher_path, args.teacher_subfolder if args.teacher else None, "mode").to(device)
    student = load_autoencoder(student_path).to(device).eval()
    lpips = None
    if args.lpips_weights:
        from latent_vae.losses.perceptual import build_lpips

        lpips = build_lpips("vgg", args.lpips_weights).to(device)
    else:
        notes.append("LPIPS: not measured (pass --lpips-weights; the VGG backbone cannot be downloaded offline)")
    source, failures = open_source(args.eval_images)
    options = EvalOptions(resolution=args.eval_resolution, batch_size=8, num_workers=0, lpips=(), fid=False)
    batches = (b["pixel_values"] for b in eval_loader(source, range(len(source)), options, device)
               if b["pixel_values"] is not None)
    metrics = distillation_quality(student, teacher, batches, device, lpips)
    notes.append(f"held-out images: {len(source)} from {args.eval_images}, centre crops at {args.eval_resolution}px"
                 + (f" ({len(failures)} unreadable)" if failures else ""))
    rows = [["teacher's own decode", f"{metrics['psnr_teacher']:.2f}", _lpips(metrics, "lpips_teacher")],
            ["student decoder on the teacher's latents", f"{metrics['psnr_student']:.2f}",
             _lpips(metrics, "lpips_student")],
            ["student decode vs teacher decode", f"{metrics['psnr_student_vs_teacher']:.2f}", ""],
            ["student round trip (its encoder + decoder)", f"{metrics['psnr_student_roundtrip']:.2f}", ""]]
    table = common.markdown_table(["reconstruction", "PSNR dB", "LPIPS-VGG"], rows)
    return (table + f"\n\nstudent encoder: relative error of the scaled latents {metrics['encoder_relative_error']:.3f}"
            + "\n\n" + "\n".join(f"- {n}" for n in notes))


def _lpips(metrics, key) -> str:
    return f"{metrics[key]:.4f}" if key in metrics else "n/a"


def main(argv=None) -> None:
    args = parse_args(argv)
    common.quiet_library_logs()
    device = torch.device(args.device)
    print(f"command: python benchmarks/bench_distill.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print("\n".join(common.machine_description(device)))
    print("\n## Speed: student vs teacher\n")
    print(speed_table(args, device))
    if not args.skip_quality:
        print("\n## Quality after a stated budget\n")
        with tempfile.TemporaryDirectory() as workdir:
            print(quality_table(args, device, Path(workdir)))


if __name__ == "__main__":
    main()
