"""Training-data throughput from shards: images/s read, decoded and cropped for training, from an
image folder (the plain baseline: map-style ``TrainDataset``) and from the same images in webdataset
tar and parquet shards (``StreamLoader``), with 1 and with P processes reading their rank's shards.

Every variant reads the same ``--images`` JPEG images (``--size`` px, photo-like noise) into
``--resolution`` px training crops in batches of ``--batch-size``, one epoch per repeat, with
``data.num_workers=0`` (one reader per process; loader workers multiply every variant alike); the
repeats run the variants in turn, so a change in the machine's load affects them all alike. With
P processes, P OS processes start together, each reads its rank's 1/P of the shards, and the
throughput is all images over the wall time of the slowest. RSS is sampled every 50 ms in each process;
the table gives its largest growth over the epoch (the reader's memory, not the imported libraries').

This measures the data path only (no model): the rate a training or encode job cannot exceed.

examples:
  python benchmarks/bench_stream.py
  python benchmarks/bench_stream.py --images 4096 --size 512 --processes 1,2,4,8 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
from common import Stats, machine_description, markdown_table
from PIL import Image


def write_inputs(root: Path, images: int, size: int, shards: int) -> None:
    """The same JPEG files as a folder, as tar shards and as parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    (root / "folder").mkdir(parents=True)
    blobs = []
    for i in range(images):
        smooth = rng.integers(0, 256, (size // 16, size // 16, 3)).astype(np.uint8)
        array = np.asarray(Image.fromarray(smooth).resize((size, size), Image.BICUBIC), dtype=np.int16)
        array = np.clip(array + rng.normal(0, 6, array.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
        (root / "folder" / f"{i:06d}.jpg").write_bytes(blobs[-1])
    for shard in range(shards):
        members = list(range(shard, images, shards))
        with tarfile.open(root / f"data-{shard:06d}.tar", "w") as tar:
            for i in members:
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(blobs[i])
                tar.addfile(info, io.BytesIO(blobs[i]))
        table = pa.table({"key": [f"{i:06d}" for i in members],
                          "image": [{"bytes": blobs[i], "path": None} for i in members]})
        pq.write_table(table, root / f"data-{shard:06d}.parquet", row_group_size=256)


def _config(variant: str, root: Path, args) -> List[str]:
    common = [f"data.resolution={args.resolution}", f"data.resize={args.resolution}", "data.num_workers=0",
              "data.val_images=0", "data.verify=false", f"train.batch_size={args.batch_size}"]
    if variant == "folder":
        return [f"data.path={root / 'folder'}", *common]
    return [f"data.shards={root}/data-*.{variant}", "data.shuffle_buffer=256", *common]


def _read_share(variant: str, root: str, args, rank: int, world: int, start, results) -> None:
    """One process: its share of one epoch, timed from the common start."""
    import psutil
    import torch

    torch.set_num_threads(1)
    from latent_vae.config import load_config
    from latent_vae.data.stream_dataset import StreamLoader, training_data
    from latent_vae.train.run_io import train_loader

    cfg = load_config(None, _config(variant, Path(root), args))
    dataset, _, _ = training_data(cfg.data)
    if variant == "folder":
        accelerator = SimpleNamespace(process_index=rank, num_processes=world, device=torch.device("cpu"))
        loader = train_loader(dataset, cfg, accelerator, 0)
    else:
        loader = StreamLoader(dataset.batches(args.batch_size, 0, rank, world))
    share = args.images // world // args.batch_size
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample_rss():
        while not done.wait(0.05):
            peak[0] = max(peak[0], process.memory_info().rss)

    threading.Thread(target=sample_rss, daemon=True).start()
    start.wait()
    before = process.memory_info().rss
    began = time.perf_counter()
    batches = iter(loader)
    for _ in range(share):
        next(batches)
    elapsed = time.perf_counter() - began
    results.put((rank, elapsed, share * args.batch_size, max(peak[0], process.memory_info().rss) - before))
    done.set()


def measure(variant: str, root: Path, args, world: int) -> Dict[str, float]:
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_read_share, args=(variant, str(root), args, r, world, start, results))
               for r in range(world)]
    for worker in workers:
        worker.start()
    time.sleep(args.settle)  # every process imported and opened its input before the clock starts
    start.set()
    outcomes = [results.get(timeout=3600) for _ in workers]
    for worker in workers:
        worker.join()
    wall = max(o[1] for o in outcomes)
    return {"images_per_s": sum(o[2] for o in outcomes) / wall, "rss_growth_mib": max(o[3] for o in outcomes) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=256, help="side of the stored JPEG images")
    parser.add_argument("--resolution", type=int, default=128, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts for the shard variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=8.0, help="seconds for the processes to start")
    args = parser.parse_args()
    counts = [int(c) for c in args.processes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        print(f"writing {args.images} images as a folder, tar and parquet shards ...", file=sys.stderr)
        write_inputs(root, args.images, args.size, args.shards)
        runs = [("folder", 1)] + [(v, p) for v in ("tar", "parquet") for p in counts]
        rates: Dict[tuple, List[float]] = {run: [] for run in runs}
        peaks: Dict[tuple, List[float]] = {run: [] for run in runs}
        for repeat in range(args.repeats):  # variants interleaved: a change in the machine's load hits all alike
            for variant, world in runs:
                print(f"{variant} × {world}, repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
                result = measure(variant, root, args, world)
                rates[variant, world].append(result["images_per_s"])
                peaks[variant, world].append(result["rss_growth_mib"])
        baseline = Stats(rates["folder", 1]).median
        rows = []
        for variant, world in runs:
            stats = Stats(rates[variant, world])
            rows.append([variant if variant == "folder" else f"{variant} shards", str(world), stats.format(),
                         f"{stats.median / baseline:.2f}×", f"{max(peaks[variant, world]):.0f}"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import torch

    print("\n".join(machine_description(torch.device("cpu"))))
    print(f"\n`python benchmarks/bench_stream.py {' '.join(sys.argv[1:])}`: {args.images} JPEG images of "
          f"{args.size}², {args.resolution}² crops, batch {args.batch_size}, {args.shards} shards, "
          f"{args.repeats} repeats\n")
    print(markdown_table(["input", "processes", "images/s median (min–max)", "vs folder", "RSS growth / process MiB"],
                         rows))


if __name__ == "__main__":
    main()
