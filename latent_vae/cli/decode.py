"""latent-vae decode"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_tiling_arguments

HELP = "decode latents written by `encode` back to PNG images (previews, checks)"
DESCRIPTION = """\
Decode the first --limit rows of a latent dataset written by `latent-vae encode` to PNG
files named <row>-<id>.png. The model is the one recorded by `encode` unless --model is
given. Stored latents are unscaled and are decoded as they are (VQ: quantised by the model,
as stock diffusers does).

examples:
  latent-vae decode --latents latents/ --output-dir previews/ --limit 16
  latent-vae decode --latents latents/ --output-dir previews/ --model runs/kl-f8/model --limit 0
  latent-vae decode --latents latents_1024/ --output-dir previews/ --tiled --tile-size 512

--tiled decodes in overlapping tiles (diffusers' tiling, blended linearly over the overlap):
large images in bounded memory; docs/BENCHMARKS.md gives the seam PSNR against untiled decoding.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latents", type=Path, required=True, help="output directory of `latent-vae encode`")
    parser.add_argument("--output-dir", type=Path, required=True, help="where the PNG files are written")
    parser.add_argument("--model", help="diffusers model folder or hub id (default: the one recorded by encode)")
    parser.add_argument("--limit", type=int, default=16, help="rows to decode, from the first; 0 = all (default: 16)")
    parser.add_argument("--batch-size", type=int, help="latents per decoder call (default: 8 on CUDA, 1 on CPU)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="decoder autocast; auto: bf16 on CUDA, fp32 on CPU (default: auto)")
    add_tiling_arguments(parser, "decoding")
    parser.add_argument("--device", help="e.g. cuda:0 or cpu (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from ..encode.decode import decode_latents

    summary = decode_latents(args.latents, args.output_dir, model=args.model, limit=args.limit or None,
                             batch_size=args.batch_size, precision=args.precision, tiled=args.tiled,
                             tile_size=args.tile_size, tile_overlap=args.tile_overlap, device=args.device)
    print(f"wrote {len(summary.written)} images to {summary.output_dir}")
    return 0
