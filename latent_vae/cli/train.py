"""latent-vae train"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "train a KL, VQ or tiny (TAESD-style) autoencoder (default: the tiny CPU quickstart on sample photos)"
DESCRIPTION = """\
Train an autoencoder from a YAML recipe plus dotted key=value overrides.

With no arguments, trains the quickstart on photographs bundled with scikit-image and
matplotlib (CPU, about 3 minutes) into runs/quickstart: tiny-taesd-f4, a 0.3 M-parameter
stock AutoencoderTiny started as a low-pass autoencoder (model.init=lowpass). Without
--config, overrides apply on top of the quickstart (configs/quickstart.yaml); overrides that
name a model (model.preset, model.pretrained, model.init or regularizer.kind) replace its
model lines, so `latent-vae train model.pretrained=DIR` fine-tunes DIR as a KL model.

examples:
  latent-vae train
  latent-vae train --config configs/kl-f8.yaml --output-dir runs/kl-f8 \\
      data.path=/my/images data.resolution=256 train.batch_size=8
  latent-vae train --output-dir runs/kl-f8 --resume latest train.max_steps=400000
  accelerate launch -m latent_vae train --config configs/kl-f8.yaml --output-dir runs/kl-f8

The run directory holds config.yaml (resolved recipe), checkpoints/, logs/ (TensorBoard),
samples/ (reconstruction grids), train.log, skipped_inputs.txt, summary.json, and model/:
a stock diffusers folder (AutoencoderKL / VQModel / AutoencoderTiny .from_pretrained).

Graceful stop: SIGTERM or SIGINT (Ctrl-C) finish the current step, write a checkpoint and
exit 0; continue with --resume latest.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML, or a recipe name from configs/ (e.g. kl-f8); "
                        "default: the tiny-taesd-f4 quickstart (or the run's config.yaml when resuming)")
    parser.add_argument("--output-dir", type=Path,
                        help="run directory (default: runs/<recipe name>, runs/quickstart without --config)")
    parser.add_argument("--resume", metavar="latest|auto|PATH",
                        help="continue from the newest complete checkpoint of --output-dir (latest: error if "
                        "there is none; auto: start fresh if there is none) or from a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output-dir (without it, a fresh run there is refused)")
    parser.add_argument("--accept-changed-batch", action="store_true",
                        help="resume although the global batch (train.batch_size × train.grad_accum_steps × "
                        "processes) differs from the checkpoint's: the sample stream, and under "
                        "lr_scaling=linear the learning rate, change")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. data.path=/images train.batch_size=8")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config, quickstart_overrides
    from ..errors import TrainingError
    from ..train.loop import train

    output_dir = args.output_dir or Path("runs") / (Path(args.config).stem if args.config else "quickstart")
    config_path = args.config
    if config_path is None and args.resume and (output_dir / "config.yaml").is_file():
        config_path = output_dir / "config.yaml"
    overrides = list(args.overrides)
    if config_path is None and not overrides:
        # Only the bare quickstart must run offline as it is: without LPIPS weights it trains (and logs)
        # without them. Any run the user configured stops before its first step, naming the fix.
        overrides.insert(0, "reconstruction.perceptual_if_unavailable=disable")
    if config_path is None:
        overrides = quickstart_overrides(overrides)
    config = load_config(config_path, overrides)
    try:
        summary = train(config, output_dir, resume=args.resume, overwrite=args.overwrite,
                        accept_changed_batch=args.accept_changed_batch)
    except TrainingError as err:
        if _is_main_process():  # the processes agreed on the failure; the main one says it
            print(f"latent-vae train: error: {err}")
        return 1
    if not _is_main_process():  # one set of final lines, not one per process
        return 0
    if summary.stopped_early:
        print(f"stopped at step {summary.steps}; resume with: "
              f"latent-vae train --output-dir {output_dir} --resume latest")
    else:
        print(f"done: {summary.steps} steps; model in {summary.model_dir}")
        if summary.val_metrics:
            print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.val_metrics.items()))
        print_where_things_are(output_dir, summary.steps, "tensorboard" in config.logging.trackers)
    return 0


def print_where_things_are(output_dir: Path, steps: int, tensorboard: bool) -> None:
    """What a new user looks at next: the last reconstruction grid, the TensorBoard logs, and how to load the model."""
    model_dir = output_dir / "model"
    class_name = json.loads((model_dir / "config.json").read_text())["_class_name"]
    print(f"reconstructions (inputs above, outputs below): {output_dir / 'samples' / f'reconstructions-{steps:08d}.png'}")
    if tensorboard:
        print(f"TensorBoard logs: {output_dir / 'logs'}  (view: tensorboard --logdir {output_dir / 'logs'})")
    print(f'load the model: from diffusers import {class_name}; vae = {class_name}.from_pretrained("{model_dir}")')


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
