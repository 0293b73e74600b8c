"""The bare quickstart (`latent-vae train`, no arguments): wall time, and reconstruction quality on
held-out photos against a plain baseline in the same run.

Trains the quickstart into a temporary folder (or evaluates ``--model``), then reconstructs the
centre ``--resolution``² crops of every photo under ``--data`` (shorter side first resized to
``--resize``, as the quickstart's ``data.resize``) as stock diffusers does (a KL model from its
posterior mean). The baseline is the
same crops area-downsampled by the model's factor and upsampled bicubically: 3 numbers per latent
cell, no learning. Also reported: the mean colour error (output − input, per channel, on [0, 1]),
which shows a tint, the PSNR after correcting each crop's mean colour, and how much of the colour of
each latent cell (4×4 block means) comes back along three opponent axes: luma (R+G+B), red–green
(R−G) and yellow–blue (R+G−2B), as R² = 1 − error variance ÷ input variance.

    python benchmarks/bench_quickstart.py --data ../shared/data/cbsd68 ../shared/data/mcmaster
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common


def held_out_crops(folder: Path, resize: int, resolution: int) -> torch.Tensor:
    from latent_vae.data.images import load_image
    from latent_vae.data.sources import list_image_files
    from latent_vae.data.transforms import crop_image, to_tensor

    files, problems = list_image_files(folder)
    if problems or not files:
        sys.exit(f"bench_quickstart: {folder}: no readable images ({len(problems)} problems)")
    return torch.stack([to_tensor(crop_image(load_image(f), resolution, resize, "center", False, random.Random(0)))
                        for f in files])


# Opponent colour axes (orthonormal rows): luma, red–green, yellow–blue.
OPPONENT_AXES = F.normalize(torch.tensor([[1.0, 1, 1], [1, -1, 0], [1, 1, -2]]), dim=1)


def cell_colour_r2(reconstructions: torch.Tensor, crops: torch.Tensor, factor: int) -> torch.Tensor:
    """R² of the latent cells' mean colour along each opponent axis, over all cells of all crops:
    1 means the axis comes back exactly, 0 means no better than that axis's mean."""
    def cells(images: torch.Tensor) -> torch.Tensor:
        means = F.avg_pool2d(images, factor)
        return torch.einsum("ac,nchw->anhw", OPPONENT_AXES, means).flatten(1)  # (3, cells)

    target, output = cells(crops), cells(reconstructions)
    return 1 - (output - target).pow(2).mean(dim=1) / target.var(dim=1)


def scores(reconstructions: torch.Tensor, crops: torch.Tensor, factor: int) -> list:
    from latent_vae.evaluate.metrics import psnr_per_image, to_unit_range

    shift = (to_unit_range(reconstructions) - to_unit_range(crops)).mean(dim=(2, 3))  # (N, 3)
    corrected = reconstructions - 2 * shift[:, :, None, None]
    return [f"{psnr_per_image(reconstructions, crops).mean():.2f}",
            ", ".join(f"{v:+.3f}" for v in shift.mean(dim=0).tolist()),
            f"{psnr_per_image(corrected, crops).mean():.2f}",
            ", ".join(f"{v:.2f}" for v in cell_colour_r2(reconstructions, crops, factor).tolist())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", type=Path, required=True, help="folders of held-out photos")
    parser.add_argument("--model", type=Path, help="evaluate this model folder instead of training the quickstart")
    parser.add_argument("--resize", type=int, default=128, help="shorter side before the centre crop (default 128)")
    parser.add_argument("--resolution", type=int, default=64, help="crop side in px (default 64)")
    parser.add_argument("--grid", type=Path, help="write a PNG: the first 12 crops of the first --data folder "
                                                  "above their reconstructions")
    args = parser.parse_args()

    from latent_vae.models.loading import load_autoencoder
    from latent_vae.models.stock import downsample_factor, reconstruct

    rows, wall = [], None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from latent_vae.config import QUICKSTART, load_config
            from latent_vae.train.loop import train

            common.quiet_library_logs()
            # what the bare `latent-vae train` runs
            config = load_config(None, [*QUICKSTART, "reconstruction.perceptual_if_unavailable=disable"])
            start = time.perf_counter()
            model_dir = train(config, Path(tmp) / "quickstart").model_dir
            wall = time.perf_counter() - start
        vae = load_autoencoder(str(model_dir)).eval()
        factor = downsample_factor(vae)
        for folder in args.data:
            crops = held_out_crops(folder, args.resize, args.resolution)
            with torch.no_grad():
                learned = reconstruct(vae, crops).clamp(-1, 1)
            if args.grid and folder == args.data[0]:
                from torchvision.utils import save_image

                save_image(torch.cat([crops[:12], learned[:12]]).add(1).div(2), args.grid, nrow=min(12, len(crops)),
                           padding=2, pad_value=1.0)
            plain = F.interpolate(F.avg_pool2d(crops, factor), scale_factor=factor, mode="bicubic").clamp(-1, 1)
            rows.append([folder.name, len(crops), "quickstart model", *scores(learned, crops, factor)])
            rows.append([folder.name, len(crops), f"plain: area ÷{factor}, bicubic ×{factor}", *scores(plain, crops, factor)])
    print("\n".join(common.machine_description(torch.device("cpu"))))
    print("command: python " + " ".join(sys.argv))
    if wall is not None:
        print(f"quickstart training wall time: {wall:.0f} s")
    print()
    print(common.markdown_table(["photos", "crops", "reconstruction", "PSNR dB", "mean colour error R, G, B",
                                 "PSNR, mean colour corrected",
                                 "cell colour R²: luma, red–green, yellow–blue"], rows))


if __name__ == "__main__":
    main()
