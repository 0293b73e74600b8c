"""latent-vae distill"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "distil a VAE (AutoencoderKL) into a tiny, fast stock AutoencoderTiny (TAESD-style)"
DESCRIPTION = """\
Train a stock diffusers AutoencoderTiny whose encoder maps images to the teacher's scaled
latents (the latents its diffusion pipelines denoise: (z - shift_factor) * scaling_factor)
and whose decoder maps those latents back to images, so that

    pipe.vae = AutoencoderTiny.from_pretrained("runs/tiny/model")

works in the teacher's pipeline with no other change. The encoder is trained with MSE against
the teacher's scaled latents; the decoder with the project's autoencoder loss on the teacher's
latents (pixel + LPIPS + PatchGAN, adaptive or fixed weight; optionally matching the teacher's
own decode: distill.teacher_decode_weight). distill.parts=encoder|decoder|both (decoder only:
the common case for previews). Student sizes: distill.student=taesd|taesd-small|taesd-large,
any AutoencoderTiny argument via distill.student_config.<arg>=value.

examples:
  latent-vae distill --teacher stabilityai/sd-vae-ft-ema --output-dir runs/tiny data.path=/my/images
  latent-vae distill --teacher runwayml/stable-diffusion-v1-5 --teacher-subfolder vae \\
      --output-dir runs/tiny distill.parts=decoder
  latent-vae distill --output-dir runs/tiny --resume latest
  accelerate launch -m latent_vae distill --teacher /my/vae --output-dir runs/tiny

The run directory holds what `train` writes (config.yaml, checkpoints/, logs/ with TensorBoard
scalars and input | teacher | student grids, samples/, train.log, summary.json) and model/: a
stock AutoencoderTiny folder whose README.md states the teacher, the latent convention and the
measured quality and speed. SIGTERM/SIGINT write a checkpoint and exit; --resume latest continues.
"""

DEFAULT_RECIPE = "distill-taesd"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", help="the teacher: a diffusers AutoencoderKL folder or hub id "
                        "(sets distill.teacher; kept from the run's config.yaml when resuming)")
    parser.add_argument("--teacher-subfolder", help="the teacher's subfolder, e.g. vae for a full pipeline "
                        "repository (sets distill.teacher_subfolder)")
    parser.add_argument("--config", help=f"recipe YAML or a recipe name from configs/ (default: {DEFAULT_RECIPE}, "
                        "or the run's config.yaml when resuming)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    parser.add_argument("--resume", metavar="latest|auto|PATH",
                        help="continue from the newest complete checkpoint of --output-dir (latest: error if there "
                        "is none; auto: start fresh if there is none) or from a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output-dir (without it, a fresh run there is refused)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. data.path=/images distill.parts=decoder")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..distill.loop import distill
    from ..errors import TrainingError

    config_path = args.config
    if config_path is None:
        resumed = args.output_dir / "config.yaml"
        config_path = resumed if args.resume and resumed.is_file() else DEFAULT_RECIPE
    config = load_config(config_path, args.overrides)
    # Set after parsing, not as overrides: a path is a string whatever YAML would make of it.
    if args.teacher:
        config.distill.teacher = args.teacher
    if args.teacher_subfolder:
        config.distill.teacher_subfolder = args.teacher_subfolder
    try:
        summary = distill(config, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    except TrainingError as err:
        print(f"latent-vae distill: error: {err}")
        return 1
    if summary.stopped_early:
        print(f"stopped at step {summary.steps}; resume with: latent-vae distill --output-dir {args.output_dir} "
              "--resume latest")
    else:
        print(f"done: {summary.steps} steps; student in {summary.model_dir}")
        if summary.val_metrics:
            print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.val_metrics.items()))
    return 0
