"""latent-vae visualize"""

from __future__ import annotations

import argparse

from ._args import add_common_arguments, load_model_from_args, print_unreadable

HELP = "show latent channels, a PCA-to-RGB rendering and per-channel histograms of images' latents"
DESCRIPTION = """\
See what the tokenizer does to a few images.

Latents are posterior means (KL) or the quantised latents the decoder receives (VQ).

Writes to --output-dir:
  <image>_channels.png  each latent channel as a greyscale tile (min-max scaled per channel),
                        upscaled to the input size, row by row in channel order
  <image>_pca.png       input | reconstruction | the first three principal components of the
                        latent's channel vectors as RGB (PCA fitted over all given images, so
                        colours are comparable between them)
  histograms.png        per channel, the histogram of the scaled latents
                        ((z - shift_factor) * scaling_factor) over all images vs N(0, 1)
  latent_stats.csv      per channel: mean, std, min, max, fraction beyond +-3
  spectrum.png          radially averaged power spectrum of the latents (model latents, solid)
                        and of the images downscaled to the latent grid (dashed), with the
                        fraction of power above half Nyquist of each (docs/DIFFUSABILITY.md)
  unreadable.csv        inputs that could not be read, with reasons (only if any)

examples:
  latent-vae visualize --model runs/quickstart/model photo.png --output-dir viz
  latent-vae visualize --model runs/kl-f8/model photos/ --resolution 256 --output-dir viz
  latent-vae visualize --model runs/vq-f8/model a.png b.png --device cuda --output-dir viz
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "images to show (a handful: all are held in memory)")


def run(args: argparse.Namespace) -> int:
    from ..latent_tools.common import open_inputs
    from ..latent_tools.visualization import write_visualizations

    model = load_model_from_args(args)
    source, failures = open_inputs(args.images)
    result = write_visualizations(model, source, args.output_dir, args.resolution, known_failures=failures)
    print(f"{len(result.keys)} images: {len(result.files)} files in {args.output_dir}")
    for row in result.statistics:
        print(f"  channel {row['channel']}: mean {row['mean']:+.3f}  std {row['std']:.3f}  "
              f"range [{row['min']:.2f}, {row['max']:.2f}]  beyond ±3: {row['beyond_3']:.1%}")
    print_unreadable(result.failures, args.output_dir / "unreadable.csv")
    return 0
