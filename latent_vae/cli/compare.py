"""latent-vae compare"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import check_output_files
from .eval import add_evaluation_arguments, evaluation_options

HELP = "compare two autoencoders on the same images: is B a drop-in replacement for A?"
DESCRIPTION = """\
Evaluate models A and B on the same images (the metrics of `latent-vae eval`), then measure
how far B's latents are from A's and how well B's decoder handles A's latents, and say plainly
whether B can replace A under a diffusion model trained on A's latents.

  latent drift   relative L2 of B's latents against A's (raw, and scaled as the diffusion
                 model sees them: (z - shift_factor) * scaling_factor), per-channel mean
                 shift and std ratio of the scaled latents
  cross-decode   PSNR/SSIM of B's decoder on A's latents: what text-to-image generation
                 with B produces from a diffusion model trained on A
  verdict        drop-in (scaled drift <= 0.03, below the smallest noise the sampler adds),
                 check samples (<= 0.15), or not a drop-in; see docs/EVALUATION.md

A decoder-only fine-tune of A (encoder frozen) has zero drift and is always a drop-in.

examples:
  latent-vae compare --model-a old_vae/ --model-b runs/ft/model --data /val/images
  latent-vae compare --model-a stabilityai/sd-vae-ft-mse --model-b runs/kl-f8/model \\
      --data /val/images --resolution 256 --no-fid --json comparison.json
  latent-vae compare --model-a stabilityai/sd-vae-ft-ema --model-b runs/tiny/model --data /val/images
      (a distilled AutoencoderTiny: its latents are compared with A's scaled latents)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-a", required=True, help="the reference autoencoder (folder or hub id)")
    parser.add_argument("--model-b", required=True, help="the candidate replacement (folder or hub id)")
    parser.add_argument("--subfolder-a", help="subfolder of --model-a holding the autoencoder (e.g. vae)")
    parser.add_argument("--subfolder-b", help="subfolder of --model-b holding the autoencoder")
    add_evaluation_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the comparison (metrics, drift, verdict) here")


def run(args: argparse.Namespace) -> int:
    import json

    from ..data.sources import open_source
    from ..distributed import process_state
    from ..evaluate.compare import compare, format_comparison
    from ..models.loading import load_autoencoder

    check_output_files(args.json)  # before the comparison, not after it
    options = evaluation_options(args)
    model_a = load_autoencoder(args.model_a, subfolder=args.subfolder_a)
    model_b = load_autoencoder(args.model_b, subfolder=args.subfolder_b)
    source, failures = open_source(args.data, args.image_column, args.split)
    comparison = compare(model_a, model_b, source, options, failures=failures)
    if process_state().is_main_process:
        if args.json is not None:
            args.json.write_text(json.dumps(comparison.summary(), indent=2) + "\n")
            print(f"comparison: {args.json}")
        print(format_comparison(comparison))
    return 0
