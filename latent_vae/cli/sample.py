"""latent-vae sample"""

from __future__ import annotations

import argparse

from ._args import add_common_arguments, load_model_from_args, positive_int, print_unreadable

HELP = "decode samples of the latent prior or of a Gaussian fitted to encoded images"
DESCRIPTION = """\
Draw random latents and decode them.

--distribution:
  prior         KL: z ~ N(0, I), the prior of the KL term. VQ: a uniformly random code at
                every latent position.
  scaled-prior  KL: N(0, I) in the scaled space diffusion models use,
                z = eps / scaling_factor + shift_factor (the data latents' scale).
  fitted        a Gaussian fitted to the latents of IMAGES (default when IMAGES are given):
                per-channel mean and variance (--covariance diagonal) or the full covariance
                across channels (--covariance full), the same at every latent position.

Expect texture, not pictures: latent positions are sampled independently, and a tokenizer
trained with a tiny KL weight (1e-6, the Stable Diffusion recipe) has latents far from
N(0, I). Modelling the joint distribution is the diffusion model's job; see
docs/LATENT_TOOLS.md.

Writes to --output-dir: samples_grid.png, samples/00000.png ..., fitted_gaussian.json
(fitted only), unreadable.csv (fitting images that could not be read; only if any).

examples:
  latent-vae sample --model runs/kl-f8/model --count 16 --output-dir samples
  latent-vae sample --model runs/kl-f8/model --distribution scaled-prior --resolution 256 --output-dir samples
  latent-vae sample --model runs/kl-f8/model photos/ --covariance full --count 64 --seed 1 --output-dir samples
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "images the Gaussian is fitted to (--distribution fitted)", images_required=False)
    parser.add_argument("--distribution", choices=("prior", "scaled-prior", "fitted"),
                        help="what to sample (default: fitted when IMAGES are given, else prior)")
    parser.add_argument("--covariance", choices=("diagonal", "full"), default="diagonal",
                        help="fitted Gaussian: per-channel variances or full covariance across channels "
                        "(default diagonal)")
    parser.add_argument("--count", type=positive_int, default=16, help="number of samples (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")


def run(args: argparse.Namespace) -> int:
    from ..latent_tools.common import open_inputs
    from ..latent_tools.sampling import write_samples

    distribution = args.distribution or ("fitted" if args.images else "prior")
    model = load_model_from_args(args)
    source, failures = open_inputs(args.images) if args.images else (None, [])
    result = write_samples(model, args.output_dir, args.resolution, args.count, distribution, source,
                           args.covariance, args.seed, args.batch_size, known_failures=failures)
    fitted = (f" (Gaussian, {result.gaussian.kind} covariance, fitted on {result.gaussian.fitted_on} latent positions)"
              if result.gaussian else "")
    print(f"{len(result.files)} samples from {distribution}{fitted}: {result.grid}")
    print_unreadable(result.failures, args.output_dir / "unreadable.csv")
    return 0
