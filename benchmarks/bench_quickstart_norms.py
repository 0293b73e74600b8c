"""What held the first quickstart's colours back: its architecture (tiny-kl-f4) with and without GroupNorm,
and a stock architecture that has none (diffusers' AutoencoderTiny, from its random initialisation or from
the low-pass start the quickstart now uses), trained the same way on the same photos.

Each variant is trained by a minimal replica of the quickstart's objective, not by `latent-vae train`
(which cannot build the diagnostic variants): the quickstart's training photos (shorter side resized
to 128, random 64² crops with flips), batch 8, Adam (0.9, 0.999) at ``--lr`` (default 2e-3, the KL
quickstart's; the quickstart now trains at 1e-3) after ``--warmup`` steps of linear warm-up (default 0;
the trainer's formula), L2 summed over pixels, plus
the KL term (weight 1e-6, summed) for the AutoencoderKL variants; raw weights at the end, no EMA.
Scores are bench_quickstart.py's on the centre crops of the photos under ``--data``.

Variants:
  stock            tiny-kl-f4 as the first quickstart built it (diffusers AutoencoderKL, GroupNorm 8 groups)
  no-groupnorm     the same network with every GroupNorm replaced by the identity (diagnostic only:
                   diffusers' AutoencoderKL cannot be built or loaded without its norms)
  centred          every GroupNorm replaced by subtracting each image's mean over channels and pixels
                   (GroupNorm with one group, without the division): the mean removal on its own
  autoencoder-tiny diffusers AutoencoderTiny (TAESD's design: no normalisation, no KL), f4, width 32,
                   8 latent channels, ~0.32M parameters (tiny-kl-f4: ~0.25M): preset tiny-taesd-f4
  lowpass          the same AutoencoderTiny started as a low-pass autoencoder (model.init=lowpass): the
                   quickstart's model

    python benchmarks/bench_quickstart_norms.py --data ../shared/data/cbsd68 ../shared/data/mcmaster
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

import common
from bench_quickstart import held_out_crops, scores

VARIANTS = ("stock", "no-groupnorm", "centred", "autoencoder-tiny", "lowpass")
RESOLUTION, RESIZE, FACTOR = 64, 128, 4  # the quickstart's crops and resize; every variant is f4


class ImageCentring(nn.Module):
    """Subtracts each image's mean over all channels and positions (GroupNorm(1)'s centring alone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True)


def build(variant: str) -> nn.Module:
    from diffusers import AutoencoderKL

    from latent_vae.config import ModelConfig
    from latent_vae.models.loading import build_autoencoder
    from latent_vae.presets import PRESETS

    if variant in ("autoencoder-tiny", "lowpass"):
        init = "lowpass" if variant == "lowpass" else "default"
        return build_autoencoder(ModelConfig(preset="tiny-taesd-f4", init=init))
    model = AutoencoderKL(**PRESETS["tiny-kl-f4"].kwargs)
    if variant != "stock":
        replacement = nn.Identity if variant == "no-groupnorm" else ImageCentring
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.GroupNorm):
                    setattr(parent, name, replacement())
    return model


def training_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The quickstart's objective: L2 summed over pixels, plus the summed KL (weight 1e-6) of a
    posterior sample for AutoencoderKL; AutoencoderTiny has no posterior."""
    from latent_vae.models.stock import is_tiny, posterior, reconstruct

    if is_tiny(model):
        return (reconstruct(model, batch) - batch).pow(2).sum(dim=(1, 2, 3)).mean()
    distribution = posterior(model, batch)
    reconstruction = model.decode(distribution.sample()).sample
    return (reconstruction - batch).pow(2).sum(dim=(1, 2, 3)).mean() + 1e-6 * distribution.kl().sum() / len(batch)


def train(variant: str, steps: int, seed: int, photos: list, learning_rate: float, warmup: int) -> tuple:
    from latent_vae.data.transforms import crop_resized, to_tensor

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build(variant)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup, 1)))
    start = time.perf_counter()
    for _ in range(steps):
        batch = torch.stack([to_tensor(crop_resized(rng.choice(photos), RESOLUTION, "random", True, rng))
                             for _ in range(8)])
        loss = training_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", type=Path, required=True, help="folders of held-out photos")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=800, help="training steps (default 800, the quickstart's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up (default 0)")
    parser.add_argument("--grid", type=Path, help="write a PNG: the first 12 crops of the first --data folder, "
                                                  "then each variant's reconstructions of them (first seed)")
    args = parser.parse_args()

    from latent_vae.data.images import load_image
    from latent_vae.data.sources import SAMPLE_TRAIN_PHOTOS, sample_photo_path
    from latent_vae.data.transforms import resize_for_crop
    from latent_vae.models.stock import reconstruct

    photos = [resize_for_crop(load_image(sample_photo_path(name)), RESOLUTION, RESIZE) for name in SAMPLE_TRAIN_PHOTOS]
    held_out = {folder.name: held_out_crops(folder, RESIZE, RESOLUTION) for folder in args.data}
    rows, grid_rows = [], [next(iter(held_out.values()))[:12]]
    for variant in args.variants:
        for seed in args.seeds:
            model, wall = train(variant, args.steps, seed, photos, args.lr, args.warmup)
            for position, (name, crops) in enumerate(held_out.items()):
                with torch.no_grad():
                    reconstruction = reconstruct(model, crops).clamp(-1, 1)
                rows.append([variant, seed, f"{wall:.0f}", name, *scores(reconstruction, crops, FACTOR)])
                if seed == args.seeds[0] and position == 0:
                    grid_rows.append(reconstruction[:12])
            print(f"{variant} seed {seed}: {wall:.0f} s", file=sys.stderr, flush=True)
    if args.grid:
        from torchvision.utils import save_image

        save_image(torch.cat(grid_rows).add(1).div(2), args.grid, nrow=len(grid_rows[0]), padding=2, pad_value=1.0)
    print("\n".join(common.machine_description(torch.device("cpu"))))
    print("command: python " + " ".join(sys.argv))
    print(f"{args.steps} steps per run, Adam at {args.lr:g} after {args.warmup} warm-up steps\n")
    print(common.markdown_table(["variant", "seed", "train s", "photos", "PSNR dB", "mean colour error R, G, B",
                                 "PSNR, mean colour corrected", "cell colour R²: luma, red–green, yellow–blue"],
                                rows))


if __name__ == "__main__":
    main()
