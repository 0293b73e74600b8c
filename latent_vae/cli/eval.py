"""latent-vae eval"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

from ..evaluate.options import FID_FEATURE_SIZES, LPIPS_BACKBONES, PRECISIONS
from . import add_tiling_arguments
from ._args import check_output_files

HELP = "reconstruction metrics on images: PSNR, SSIM, LPIPS, rFID, codebook usage, active latent units"
DESCRIPTION = """\
Evaluate a diffusers AutoencoderKL, VQModel or AutoencoderTiny on a folder or dataset of images.

Every image is resized (shorter side) to --resolution and centre-cropped, encoded, decoded
(posterior mean; --sample decodes a seeded posterior sample) and scored:
  PSNR, SSIM    per image on [0,1], 11x11 Gaussian SSIM window, data_range 1
  LPIPS         AlexNet (the usual metric) and VGG (the training loss) backbones
  rFID          InceptionV3 features of originals vs reconstructions (torchmetrics/torch-fidelity);
                only comparable between runs with the same images and resolution
  VQ models     codebook usage and perplexity over the whole set
  KL models     KL per latent channel and active units (posterior-collapse monitor)
  --diffusability  latent high-frequency fraction vs RGB, equivariance PSNR, channel statistics
Unreadable images are skipped and listed by path and reason in the output and the JSON.

LPIPS and rFID need pretrained network weights that are downloaded at first use. Offline,
pass local files (--lpips-weights, --fid-weights) or skip the metric (--no-lpips, --no-fid);
a random network is never used instead.

examples:
  latent-vae eval --model runs/kl-f8/model --data /val/images --resolution 256 \\
      --json metrics.json --csv per_image.csv --grid recon.png
  latent-vae eval --model runs/vq-f8/model --data /val/images --no-fid \\
      --lpips-weights alex=/weights/alexnet-owt-7be5be79.pth --lpips alex
  latent-vae eval --model stabilityai/sd-vae-ft-mse --data /val/images --resolution 512 --tiled \\
      --fid-weights /weights/weights-inception-2015-12-05-6726825d.pth
  accelerate launch -m latent_vae eval --model runs/kl-f8/model --data /val/images --json m.json
"""


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """Data, preprocessing and metric options shared by `eval` and `compare`."""
    data = parser.add_argument_group("images")
    data.add_argument("--data", required=True,
                      help="image folder (searched recursively), save_to_disk dataset, or hub dataset name")
    data.add_argument("--image-column", default="image", help="image column of a dataset (default: image)")
    data.add_argument("--split", default="validation", help="dataset split (default: validation)")
    data.add_argument("--resolution", type=int, default=256,
                      help="resize the shorter side to this and centre-crop (default: 256)")
    data.add_argument("--limit", type=int, help="evaluate only the first N images")
    data.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    data.add_argument("--num-workers", type=int,
                      help="DataLoader workers (default: the CPUs this process may use minus one, at most 4)")
    model = parser.add_argument_group("reconstruction")
    model.add_argument("--sample", action="store_true",
                       help="KL models: decode a posterior sample (seeded per image) instead of the mean")
    model.add_argument("--seed", type=int, default=0, help="seed of --sample (default: 0)")
    add_tiling_arguments(model, "encode/decode")
    model.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="autocast dtype of the model (default: fp32; metrics are always fp32)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--lpips", nargs="+", choices=LPIPS_BACKBONES, default=list(LPIPS_BACKBONES),
                         help="LPIPS backbones (default: alex vgg)")
    metrics.add_argument("--lpips-weights", action="append", default=[], metavar="[alex=|vgg=]PATH",
                         help="local torchvision backbone weights (alexnet-owt-7be5be79.pth, vgg16-397923af.pth); "
                              "repeat for both; the backbone is read from the file name or the prefix")
    metrics.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    metrics.add_argument("--fid-weights", metavar="PATH",
                         help="local InceptionV3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                              "or a .safetensors of it)")
    metrics.add_argument("--fid-features", type=int, choices=FID_FEATURE_SIZES, default=2048,
                         help="InceptionV3 feature layer for rFID (default: 2048, the standard)")
    metrics.add_argument("--no-fid", action="store_true", help="skip rFID")
    metrics.add_argument("--diffusability", action="store_true",
                         help="also measure what a diffusion model gets from the latents: latent vs RGB power spectrum "
                              "(high-frequency fraction), equivariance PSNR under x0.5/x0.75 downscale, rotations and "
                              "hflip, per-channel mean/std/correlation (docs/DIFFUSABILITY.md)")


def lpips_weight_files(entries: List[str], nets: List[str]) -> Dict[str, str]:
    """``--lpips-weights`` entries (``net=PATH`` or ``PATH``) -> {backbone: path}."""
    from ..errors import ConfigError

    files = {}
    for entry in entries:
        net, separator, path = entry.partition("=")
        if not (separator and net in LPIPS_BACKBONES):
            path, name = entry, Path(entry).name.lower()
            net = "alex" if "alex" in name else "vgg" if "vgg" in name else (nets[0] if len(nets) == 1 else "")
            if not net:
                raise ConfigError(f"--lpips-weights {entry}: cannot tell the backbone from the file name; "
                                  f"write alex={entry} or vgg={entry}")
        files[net] = path
    return files


def evaluation_options(args: argparse.Namespace):
    from ..evaluate.options import EvalOptions

    nets = [] if args.no_lpips else list(dict.fromkeys(args.lpips))
    return EvalOptions(
        resolution=args.resolution, batch_size=args.batch_size,
        **({"num_workers": args.num_workers} if args.num_workers is not None else {}),
        sample=args.sample, seed=args.seed, limit=args.limit, tiled=args.tiled, tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        precision=args.precision, lpips=tuple(nets), lpips_weights=lpips_weight_files(args.lpips_weights, nets),
        fid=not args.no_fid, fid_weights=args.fid_weights, fid_features=args.fid_features,
        grid_images=getattr(args, "grid_images", 0), diffusability=args.diffusability,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers model folder (e.g. runs/kl-f8/model) or hub id")
    parser.add_argument("--subfolder", help="subfolder of --model holding the autoencoder (e.g. vae)")
    add_evaluation_arguments(parser)
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--json", type=Path, help="write the summary (metrics, skipped inputs, settings) here")
    outputs.add_argument("--csv", type=Path, help="write per-image scores here")
    outputs.add_argument("--grid", type=Path, help="write a PNG grid: originals above reconstructions")
    outputs.add_argument("--grid-images", type=int, default=8, help="images in the grid (default: 8)")


def run(args: argparse.Namespace) -> int:
    from ..data.sources import open_source
    from ..distributed import process_state
    from ..evaluate.evaluation import evaluate
    from ..evaluate.report import format_summary, write_outputs
    from ..models.loading import load_autoencoder

    check_output_files(args.json, args.csv, args.grid)  # before the evaluation, not after it
    options = evaluation_options(args)
    model = load_autoencoder(args.model, subfolder=args.subfolder)
    source, failures = open_source(args.data, args.image_column, args.split)
    result = evaluate(model, source, options, failures=failures)
    if process_state().is_main_process:
        write_outputs(result, args.json, args.csv, args.grid)
        print(format_summary(result))
        for label, path in (("summary", args.json), ("per-image scores", args.csv), ("grid", args.grid)):
            if path is not None:
                print(f"{label}: {path}")
    return 0
