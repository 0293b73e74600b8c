"""latent-vae stats"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "latent statistics of an encoded set; writes scaling_factor / shift_factor into a model config"
DESCRIPTION = """\
Compute, in one exact streaming pass (float64), the per-channel mean and std and the global
mean and std of the latents written by `latent-vae encode`; save them to
LATENTS/latent_stats.json and, with --write-to, into the model's config.json:

  --fields global (default)  scaling_factor = 1 / global std, shift_factor = global mean
  --fields per-channel       latents_mean / latents_std per channel, scaling_factor = 1.0

Pipelines use them as follows: SD 1.x/2.x/SDXL: z * scaling_factor; SD3/FLUX:
(z - shift_factor) * scaling_factor; SDXL-family pipelines when latents_mean/latents_std are
set: (z - latents_mean) * scaling_factor / latents_std — hence scaling_factor 1.0 with the
per-channel fields (writing both sets would scale twice there). Both sets are always saved in
LATENTS/latent_stats.json. VQModel configs only have scaling_factor, AutoencoderTiny configs
scaling_factor and shift_factor: --write-to either takes --fields global (those keys only);
--fields per-channel is refused.

examples:
  latent-vae stats --latents latents/
  latent-vae stats --latents latents/ --write-to runs/kl-f8/model
  latent-vae stats --latents latents/ --write-to runs/kl-f8/model --fields per-channel
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latents", type=Path, required=True, help="output directory of `latent-vae encode`")
    parser.add_argument("--write-to", type=Path, help="diffusers model folder whose config.json gets the fields")
    parser.add_argument("--fields", choices=("global", "per-channel"), default="global",
                        help="which config fields to write (default: global; see above)")
    parser.add_argument("--column", default="latent", help="latent column to describe (default: latent)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows read at a time (default: 256)")


def run(args: argparse.Namespace) -> int:
    import json

    from ..encode.stats import check_write_target, compute_latent_statistics, write_to_model_config
    from ..runtime import atomic_write_bytes

    if args.write_to:
        check_write_target(args.write_to, args.fields)  # before the pass over the latents
    stats = compute_latent_statistics(args.latents, args.column, args.batch_size)
    atomic_write_bytes(args.latents / "latent_stats.json",
                       lambda h: h.write((json.dumps(stats.to_json(), indent=2) + "\n").encode()))
    print(f"{stats.rows} rows, {stats.values_per_channel:,} values per channel")
    print(f"{'channel':>8} {'mean':>12} {'std':>12}")
    for channel, (mean, std) in enumerate(zip(stats.channel_mean, stats.channel_std)):
        print(f"{channel:>8} {mean:>12.6f} {std:>12.6f}")
    print(f"{'global':>8} {stats.mean:>12.6f} {stats.std:>12.6f}")
    print(f"scaling_factor = 1/std = {stats.scaling_factor:.6f}, shift_factor = mean = {stats.shift_factor:.6f}")
    if args.write_to:
        updates = write_to_model_config(args.write_to, stats, args.fields)
        written = [k for k, v in updates.items() if v is not None]
        cleared = [k for k, v in updates.items() if v is None]
        print(f"wrote {', '.join(written)} to {args.write_to / 'config.json'}"
              + (f" (cleared {', '.join(cleared)})" if cleared else ""))
    return 0
