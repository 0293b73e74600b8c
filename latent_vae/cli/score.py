"""latent-vae score"""

from __future__ import annotations

import argparse

from ._args import add_common_arguments, load_model_from_args, positive_int, print_unreadable

HELP = "per-image anomaly scores (reconstruction error, LPIPS, KL) with a threshold calibrated on normal images"
DESCRIPTION = """\
Score how unlike the training data each image is: reconstruction error (pixel MSE and L1 on
[0, 1]), LPIPS when its backbone weights are available, and, for KL models, the KL of the
posterior to N(0, I) (nats per latent element). An autoencoder reconstructs what it was
trained on well and other things worse.

Threshold: --reference normal/ scores a folder of normal images and takes the --percentile
(default 99) of --score (default mse) over them; or give --threshold directly. Inputs scoring
strictly above it are counted and flagged (column anomalous = 1).

LPIPS: the backbone's ImageNet weights come from --lpips-weights, the torch hub cache or a
download; when none works LPIPS is skipped with a note (a random backbone is never used).

Writes to --output-dir: scores.csv (key, mse, l1, [lpips], [kl], [anomalous]),
reference_scores.csv, summary.json (threshold, counts), unreadable.csv and
reference_unreadable.csv (inputs that could not be read, with reasons; only if any).

examples:
  latent-vae score --model runs/quickstart/model new_images/ --reference normal/ --output-dir scores
  latent-vae score --model runs/kl-f8/model incoming/ --reference normal/ --score lpips \\
      --lpips-weights ~/vgg16-397923af.pth --lpips-net vgg --percentile 99.5 --output-dir scores
  latent-vae score --model runs/kl-f8/model incoming/ --threshold 0.004 --no-lpips --output-dir scores
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "images to score")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--reference", action="append", metavar="NORMAL",
                           help="normal images (a folder or file; repeat for several) to calibrate the threshold on")
    threshold.add_argument("--threshold", type=float, help="flag inputs whose --score is above this value")
    parser.add_argument("--score", choices=("mse", "l1", "lpips", "kl"), default="mse",
                        help="score the threshold applies to (default mse)")
    parser.add_argument("--percentile", type=float, default=99.0,
                        help="percentile of the reference scores used as threshold (default 99)")
    parser.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex",
                        help="LPIPS backbone (default alex, the usual metric)")
    parser.add_argument("--lpips-weights", metavar="PATH",
                        help="local torchvision weights file of the LPIPS backbone (offline machines)")
    parser.add_argument("--no-lpips", action="store_true", help="do not compute LPIPS")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")


def run(args: argparse.Namespace) -> int:
    from ..latent_tools.common import open_inputs
    from ..latent_tools.scoring import load_lpips, write_scores

    model = load_model_from_args(args)
    source, failures = open_inputs(args.images)
    reference, reference_failures = open_inputs(args.reference) if args.reference else (None, [])
    lpips_net, lpips_note = load_lpips(args.lpips_net, args.lpips_weights, args.no_lpips)
    if lpips_note:
        print(lpips_note)
    report = write_scores(model, source, args.output_dir, args.resolution, reference, args.score, args.percentile,
                          args.threshold, lpips_net, lpips_note, args.batch_size, known_failures=failures,
                          reference_known_failures=reference_failures)
    summary = report.summary()
    print(f"scored {summary['inputs_scored']} images ({', '.join(summary['columns'])}): {report.files['scores']}")
    if report.threshold is not None:
        print(f"threshold: {args.score} > {report.threshold:.6g} ({summary['threshold_source']})")
        flagged = ", ".join(report.exceeding[:10]) + (" ..." if len(report.exceeding) > 10 else "")
        print(f"{summary['exceeding']} of {summary['inputs_scored']} inputs exceed it "
              f"({summary['exceeding_fraction']:.1%})" + (f": {flagged}" if flagged else ""))
    print_unreadable(report.table.failures, args.output_dir / "unreadable.csv")
    if report.reference is not None:
        print_unreadable(report.reference.failures, args.output_dir / "reference_unreadable.csv")
    return 0
