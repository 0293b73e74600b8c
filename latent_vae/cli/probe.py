"""latent-vae probe"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import positive_int

HELP = "train the same small diffusion model on several tokenizers' latents and compare their denoising loss"
DESCRIPTION = """\
The diffusion probe (docs/DIFFUSABILITY.md): how easily does a diffusion model learn each
tokenizer's latents? For every --model, the images are encoded, normalised with the model's own
scaling/shift factors (what a diffusers pipeline feeds its denoiser), and the same diffusers
UNet2DModel (same widths, seed, steps, batch, learning rate; epsilon-prediction DDPM) is trained
on them for --steps steps. --held-out images are never trained on.

Reported per tokenizer, as one table, probe.json, loss_curves.png and samples.png (one row of
decoded DDIM samples per tokenizer, from the same noise):
  held-out loss   MSE(predicted noise, noise) on the held-out images at --timesteps, with
                  --noise-draws fixed noise seeds per image and timestep (identical for every
                  tokenizer), averaged over timesteps; also per timestep, and as a curve
  std             std of the normalised training latents (near 1 when scaling_factor fits)
  FID             with --fid: decoded samples vs held-out images (needs InceptionV3 weights;
                  with few samples only a rough signal)
Lower held-out loss at equal budget = latents a diffusion model fits more easily. Compare only
runs with the same settings and images.

Toy scale runs on a CPU in minutes (the defaults: 64 px, 300 steps, batch 16, UNet widths 32 64).
On a GPU raise --resolution/--steps/--batch-size/--channels for a real-scale probe.

examples:
  latent-vae probe --model runs/plain/model --model runs/scale-eq/model --data photos/ --output-dir probe
  latent-vae probe --model stabilityai/sd-vae-ft-mse --model runs/eq/model --data /val/images \\
      --resolution 256 --steps 20000 --batch-size 64 --channels 128 256 256 --samples 16 --output-dir probe
  accelerate launch -m latent_vae probe --model A --model B --data DIR --output-dir probe
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True,
                        help="diffusers AutoencoderKL / VQModel folder or hub id; repeat for each tokenizer "
                             "(MODEL:SUBFOLDER for a pipeline repository, e.g. CompVis/stable-diffusion-v1-4:vae)")
    parser.add_argument("--data", required=True,
                        help="image folder (searched recursively), save_to_disk dataset, or hub dataset name")
    parser.add_argument("--image-column", default="image", help="image column of a dataset (default: image)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where probe.json and the PNGs go")
    parser.add_argument("--resolution", type=positive_int, default=64, help="centre-crop size in pixels (default: 64)")
    parser.add_argument("--limit", type=positive_int, help="use only the first N images")
    parser.add_argument("--held-out", type=positive_int, default=8, help="images kept out of training (default: 8)")
    training = parser.add_argument_group("denoiser (the same for every tokenizer)")
    training.add_argument("--steps", type=positive_int, default=300, help="training steps (default: 300)")
    training.add_argument("--batch-size", type=positive_int, default=16, help="global batch (default: 16)")
    training.add_argument("--learning-rate", type=float, default=1.0e-3, help="AdamW learning rate (default: 1e-3)")
    training.add_argument("--channels", type=positive_int, nargs="+", default=[32, 64],
                          help="UNet2DModel widths per level, multiples of 8 (default: 32 64)")
    training.add_argument("--seed", type=int, default=0, help="seed of weights, batches and noise (default: 0)")
    measuring = parser.add_argument_group("measurement")
    measuring.add_argument("--timesteps", type=int, nargs="+", default=[50, 250, 500, 750],
                           help="fixed timesteps of the held-out loss, of 1000 (default: 50 250 500 750)")
    measuring.add_argument("--noise-draws", type=positive_int, default=4,
                           help="fixed noise seeds per held-out image and timestep (default: 4)")
    measuring.add_argument("--eval-every", type=positive_int, default=50,
                           help="held-out loss for the curve every N steps (default: 50)")
    measuring.add_argument("--samples", type=int, default=8, help="decoded DDIM samples per tokenizer (default: 8)")
    measuring.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    measuring.add_argument("--fid", action="store_true", help="FID of the decoded samples against the held-out images")
    measuring.add_argument("--fid-weights", metavar="PATH", help="local InceptionV3 weights file (see `eval --help`)")


def _labels(names):
    """Short unique labels: the last path components that tell the models apart."""
    parts = [name.rstrip("/").split("/") for name in names]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{name}" for i, name in enumerate(names)]


def run(args: argparse.Namespace) -> int:
    from ..data.sources import open_source
    from ..distributed import process_state
    from ..models.loading import load_autoencoder
    from ..probe import ProbeOptions, format_table, run_probe

    options = ProbeOptions(
        resolution=args.resolution, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        seed=args.seed, held_out=args.held_out, timesteps=tuple(args.timesteps), noise_draws=args.noise_draws,
        channels=tuple(args.channels), eval_every=args.eval_every, samples=args.samples,
        sample_steps=args.sample_steps, limit=args.limit, fid=args.fid, fid_weights=args.fid_weights)
    models = []
    for label, name in zip(_labels(args.model), args.model):
        path, _, subfolder = name.partition(":") if not Path(name).exists() else (name, "", "")
        models.append((label, load_autoencoder(path, subfolder=subfolder or None)))
    source, failures = open_source(args.data, args.image_column, args.split)
    payload = run_probe(models, source, options, args.output_dir, failures)
    if process_state().is_main_process:
        print(format_table(payload))
        print(f"results: {args.output_dir / 'probe.json'}, {args.output_dir / 'loss_curves.png'}, "
              f"{args.output_dir / 'samples.png'}")
        if payload["skipped_inputs"]:
            print(f"unreadable inputs skipped: {len(payload['skipped_inputs'])} (listed in probe.json)")
    return 0
