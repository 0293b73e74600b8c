"""Encode throughput from webdataset tar shards against an image folder holding the same images.

    flock /work/bench.lock python benchmarks/bench_encode_shards.py --images /work/shared/data/cbsd68

The same files (their bytes unchanged) are put in a folder and in tar shards of --per-shard
samples (webdataset layout, ``<key>.png``); each timed run is a whole ``encode_dataset`` call
(read, decode, preprocess, encode, write, finish) into a fresh output folder, as parquet. The
folder run is the baseline; the table gives images/s, median (min–max) over --repeats runs after
--warmup untimed ones, alternating folder and shards so that load drift hits both, and
shards/folder. Both runs must give the same rows and the same latents (checked, and printed).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import Stats, machine_description, markdown_table

from latent_vae.config import ModelConfig
from latent_vae.data.sources import IMAGE_EXTENSIONS
from latent_vae.encode.run import encode_dataset
from latent_vae.models.loading import build_autoencoder


def write_inputs(images: list, root: Path, per_shard: int) -> tuple:
    """The folder and the tar shards, holding the same image files."""
    folder, shards = root / "folder", root / "shards"
    folder.mkdir(parents=True)
    shards.mkdir()
    for i, image in enumerate(images):
        shutil.copy(image, folder / f"{i:06d}{image.suffix.lower()}")
    for start in range(0, len(images), per_shard):
        with tarfile.open(shards / f"train-{start // per_shard:06d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, len(images))):
                data = images[i].read_bytes()
                info = tarfile.TarInfo(f"{i:06d}{images[i].suffix.lower()}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder, shards


def rows_of(out: Path) -> tuple:
    table = pq.read_table(str(out / "data"))
    keys = [name.split("#")[-1] if "#" in name else Path(name).stem for name in table.column("id").to_pylist()]
    return keys, np.asarray(table.column("latent").to_pylist(), dtype=np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="/work/shared/data/cbsd68", help="a folder of photos")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=16, help="samples per tar shard (default: 16)")
    parser.add_argument("--preset", default="tiny-kl")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:args.num_images]
    if not images:
        sys.exit(f"no images in {args.images}")
    torch.manual_seed(0)
    vae = build_autoencoder(ModelConfig(preset=args.preset)).eval()
    common = dict(resolution=args.resolution, batch_size=args.batch_size, num_workers=args.num_workers,
                  output_format="parquet", progress=False, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, shards = write_inputs(images, root, args.per_shard)
        runs = {"folder": lambda out: encode_dataset(vae, folder, out, shard_size=args.per_shard, **common),
                "tar shards": lambda out: encode_dataset(vae, None, out, shards=[str(shards)], **common)}
        seconds = {name: [] for name in runs}
        outputs = {}
        for round_ in range(args.warmup + args.repeats):
            for name, run in runs.items():
                out = root / f"out-{name.replace(' ', '-')}-{round_}"
                start = time.perf_counter()
                summary = run(out)
                elapsed = time.perf_counter() - start
                assert summary.encoded == len(images), (name, summary)
                if round_ >= args.warmup:
                    seconds[name].append(elapsed)
                outputs[name] = out
        (folder_keys, folder_latents), (shard_keys, shard_latents) = (rows_of(outputs[n]) for n in runs)
        assert folder_keys == shard_keys, "the two inputs gave different rows"
        difference = float(np.abs(folder_latents - shard_latents).max())

    rates = {name: Stats([len(images) / s for s in values]) for name, values in seconds.items()}
    base = rates["folder"].median
    rows = [[args.preset, args.resolution, len(images), name, rates[name].format(digits=1),
             f"{rates[name].median / base:.2f}x"] for name in runs]
    print("\n".join(f"- {line}" for line in machine_description(torch.device(args.device))))
    print(f"- command: {' '.join(sys.argv)}")
    print(f"- {len(images)} images, tar shards of {args.per_shard}; batch {args.batch_size}, "
          f"{args.num_workers} DataLoader workers; {args.warmup} warm-up and {args.repeats} timed rounds")
    print(f"- same rows from both inputs; largest latent difference {difference:.1e}\n")
    print(markdown_table(["preset", "res", "images", "input", "images/s median (min–max)", "vs folder"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
