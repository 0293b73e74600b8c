"""latent-vae interpolate"""

from __future__ import annotations

import argparse

from ._args import add_common_arguments, load_model_from_args, positive_int, print_unreadable

HELP = "decode linear or spherical paths between the latents of two or more images (grid PNG + GIF/WebP)"
DESCRIPTION = """\
Encode images, interpolate between their latents (image 1 -> 2 -> 3 ...) and decode the path.

Latents are the posterior means (KL) or quantised latents (VQ); interpolation happens in the
scaled latent space ((z - shift_factor) * scaling_factor). slerp moves the direction along
the great circle and the norm linearly, so two latents of equal norm keep it all the way;
linear interpolation shrinks the norm mid-way (washed-out images). docs/LATENT_TOOLS.md has
the details.

Writes to --output-dir: interpolation_grid.png (one row per pair of consecutive images, one
column per step, first and last columns = the reconstructions), interpolation.gif or .webp
(the whole path; pass the first image again at the end for a closed loop), unreadable.csv
(inputs that could not be read, with reasons; only if any).

examples:
  latent-vae interpolate --model runs/quickstart/model cat.png dog.png --output-dir interp
  latent-vae interpolate --model runs/kl-f8/model a.jpg b.jpg c.jpg a.jpg --steps 12 \\
      --method slerp --format webp --resolution 256 --output-dir interp
  latent-vae interpolate --model stabilityai/sd-vae-ft-mse photos/ --method linear --output-dir interp
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "two or more images, interpolated in order")
    parser.add_argument("--steps", type=int, default=8,
                        help="frames per pair of consecutive images, endpoints included (default 8)")
    parser.add_argument("--method", choices=("slerp", "linear"), default="slerp",
                        help="spherical (direction on the great circle, norm linear) or linear (default slerp)")
    parser.add_argument("--format", choices=("gif", "webp"), default="gif", help="animation format (default gif)")
    parser.add_argument("--frame-ms", type=positive_int, default=120,
                        help="animation frame duration in ms (default 120)")


def run(args: argparse.Namespace) -> int:
    from ..latent_tools.common import open_inputs
    from ..latent_tools.interpolation import write_interpolation

    model = load_model_from_args(args)
    source, failures = open_inputs(args.images)
    result = write_interpolation(model, source, args.output_dir, args.resolution, args.steps, args.method,
                                 args.format, args.frame_ms, known_failures=failures)
    print(f"{args.method} path through {len(result.keys)} images, {args.steps} steps per pair: "
          f"{result.grid}, {result.animation}")
    print_unreadable(result.failures, args.output_dir / "unreadable.csv")
    return 0
