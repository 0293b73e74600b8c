"""Encode and decode throughput: the fast paths against a plain baseline, in the same run.

    python benchmarks/bench_encode.py --images /work/shared/data/cbsd68 --presets tiny-kl,kl-f8
    python benchmarks/bench_encode.py --device cuda --presets kl-f8 --resolutions 256,512 \\
        --decode-resolutions 256,512,1024 --tiled-resolutions 2048,4096 --num-images 256

Encode (bench_encode): images/s of the whole ``encode_dataset`` call (read, preprocess,
encode, write the shards, merge) on the same images. Plain baseline: fp32, batch 1, no
DataLoader workers, NCHW, no compile. Fast: --batch-size (32 on CUDA, 1 on CPU), workers
with prefetch (pinned memory on CUDA), channels_last, one row per --fast-precisions entry
(auto = bf16 on CUDA, fp32 on CPU), --compile on request. The fraction of the loop spent
waiting for input (on CUDA: the GPU idle for want of data) and, on CUDA, the sampled GPU
utilisation are reported, with the largest latent difference from the plain path.

Decode (bench_decode; --resolutions '' runs only these): images/s of stock ``model.decode``
on random latents, batch 1 fp32 NCHW against channels_last at --decode-batch-size and
--precision. Tiled decode: images/s, peak memory, and the seam PSNR of tiled against
untiled output where both fit (random-weight models are a worst case for seams; pass
--model to measure a trained VAE).

Timed runs alternate plain and fast (so load drift hits both), after --warmup untimed runs;
the table gives the median and the min–max spread of --repeats runs, and fast/plain.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from common import PeakMemory, Stats, format_bytes, machine_description, markdown_table, synchronize
from PIL import Image

from latent_vae.data.sources import open_source
from latent_vae.encode.decode import decode_images, load_latent_dataset
from latent_vae.encode.run import encode_dataset
from latent_vae.encode.storage import latent_to_tensor
from latent_vae.evaluate.metrics import psnr_per_image
from latent_vae.models.loading import load_autoencoder
from latent_vae.models.stock import downsample_factor, latent_channels
from latent_vae.models.tiling import configure_tiling
from latent_vae.presets import PRESETS
from latent_vae.runtime import resolve_precision


def generated_images(folder: Path, count: int) -> Path:
    """Smooth colour fields with texture, 480x320 PNG: stand-ins when no photo folder is given."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:320, 0:480] / 320.0
    for i in range(count):
        phases = rng.uniform(0, 2 * np.pi, size=(3, 2))
        image = np.stack([np.sin(3 * x + p[0]) * np.cos(2 * y + p[1]) for p in phases], axis=-1)
        image = 127.5 * (image + 1) + rng.normal(0, 12, size=image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"generated_{i:03d}.png")
    return folder


def rates(seconds: List[float], work: int) -> Stats:
    """Items per second of each run."""
    return Stats(seconds).map(lambda t: work / t)


def fmt_rate(stats: Stats) -> str:
    """median (min–max) with three significant digits at any magnitude."""
    return stats.format(digits=max(0, 2 - int(np.floor(np.log10(stats.median)))))


def alternate(runs: Dict[str, Callable[[], float]], warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds of each run, ``warmup`` untimed rounds first, the runs alternating within a round."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for round_index in range(warmup + repeats):
        for name, run in runs.items():
            seconds = run()
            if round_index >= warmup:
                times[name].append(seconds)
    return times


class UtilisationSampler:
    """Mean GPU utilisation (nvidia-smi's, via torch.cuda.utilization) while active; None without NVML."""

    def __init__(self, device: torch.device):
        self.samples: List[float] = []
        self.active = device.type == "cuda"
        self._stop = threading.Event()

    def __enter__(self):
        if self.active:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.1):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no NVML: nothing to report
                return

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self) -> Optional[float]:
        return statistics.mean(self.samples) if self.samples else None


def model_for(args, preset: str):
    """A preset with random weights (seeded), or with --model the trained model (``preset`` is its path)."""
    if args.model:
        return load_autoencoder(preset)
    torch.manual_seed(0)
    return PRESETS[preset].cls(**PRESETS[preset].kwargs).eval()


# --------------------------------------------------------------------------- encode


def bench_encode(args, preset: str, resolution: int, images: Path, work: Path, device: torch.device) -> Dict:
    source, _ = open_source(str(images), verify=False)
    source = source.subset(range(min(args.num_images, len(source))))
    vae = model_for(args, preset)
    common = dict(resolution=resolution, progress=False, overwrite=True, device=str(device))
    settings = {"plain": dict(batch_size=1, num_workers=0, precision="fp32")}
    for precision in args.fast_precisions.split(","):
        settings[f"fast {resolve_precision(precision, device)}"] = dict(
            batch_size=args.batch_size, num_workers=args.workers, precision=precision, channels_last=True,
            compile=args.compile, prefetch_factor=4)
    last: Dict[str, Path] = {}
    waits: Dict[str, List[float]] = {name: [] for name in settings}
    sampler = UtilisationSampler(device)

    def run(name: str) -> float:
        out = work / f"{preset}-{resolution}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        model = copy.deepcopy(vae)
        synchronize(device)
        start = time.perf_counter()
        summary = encode_dataset(model, source, out, **common, **settings[name])
        synchronize(device)
        seconds = time.perf_counter() - start
        waits[name].append(summary.data_wait_fraction)
        last[name] = out
        return seconds

    with sampler:
        times = alternate({name: (lambda name=name: run(name)) for name in settings}, args.warmup, args.repeats)
    latents = {name: torch.stack([latent_to_tensor(z, "fp32") for z in load_latent_dataset(path)[0]["latent"]])
               for name, path in last.items()}
    return {"preset": preset, "resolution": resolution, "images": len(source), "batch": args.batch_size,
            "rates": {name: rates(t, len(source)) for name, t in times.items()},
            "wait": {name: statistics.median(w[args.warmup:] or w) for name, w in waits.items()},
            "gpu_util": sampler.mean, "scale": latents["plain"].std().item(),
            "max_diff": {name: (z - latents["plain"]).abs().max().item() for name, z in latents.items()}}


# --------------------------------------------------------------------------- decode


def decode_rate(model, latents: torch.Tensor, batch_size: int, precision: str, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(latents), batch_size):
        decode_images(model, latents[i:i + batch_size].to(device), precision)
    synchronize(device)
    return time.perf_counter() - start


def bench_decode(args, preset: str, resolution: int, device: torch.device) -> Dict:
    vae = model_for(args, preset).to(device)
    factor, channels = downsample_factor(vae), latent_channels(vae)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.decode_images, channels, resolution // factor, resolution // factor, generator=generator)
    fast_model = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    precision = resolve_precision(args.precision, device)
    with PeakMemory(device) as memory:
        times = alternate({
            "plain": lambda: decode_rate(vae, latents, 1, "fp32", device),
            "fast": lambda: decode_rate(fast_model, latents, args.decode_batch_size, precision, device),
        }, args.warmup, args.repeats)
    return {"preset": preset, "resolution": resolution, "images": len(latents), "precision": precision,
            "batch": args.decode_batch_size, "rates": {name: rates(t, len(latents)) for name, t in times.items()},
            "peak": f"{format_bytes(memory.peak)} {memory.kind}"}


def bench_tiled_decode(args, preset: str, resolution: int, device: torch.device) -> Dict:
    vae = model_for(args, preset).to(device)
    factor = downsample_factor(vae)
    latents = torch.randn(1, latent_channels(vae), resolution // factor, resolution // factor,
                          generator=torch.Generator().manual_seed(0)).to(device)
    tiled = copy.deepcopy(vae)
    configure_tiling(tiled, args.tile_size, args.tile_overlap)
    precision = resolve_precision(args.precision, device)
    with PeakMemory(device) as memory:
        times = alternate({"tiled": lambda: decode_rate(tiled, latents, 1, precision, device)},
                          args.warmup, args.repeats)
    tiled_images = decode_images(tiled, latents, precision)[0]
    try:
        psnr = float(psnr_per_image(tiled_images, decode_images(vae, latents, precision)[0]).mean())
    except torch.OutOfMemoryError:
        psnr = None
    return {"preset": preset, "resolution": resolution, "rates": {"tiled": rates(times["tiled"], 1)},
            "peak": f"{format_bytes(memory.peak)} {memory.kind}", "psnr": psnr, "precision": precision}


# --------------------------------------------------------------------------- report


def report(encode_rows: List[Dict], decode_rows: List[Dict], tiled_rows: List[Dict]) -> str:
    sections = []
    if encode_rows:
        rows = []
        for r in encode_rows:
            plain = r["rates"]["plain"].median
            util = f"{r['gpu_util']:.0f}%" if r["gpu_util"] is not None else "n/a"
            for name, rate in r["rates"].items():
                path = "plain: fp32, batch 1, no workers, NCHW" if name == "plain" else \
                    f"{name}: batch {r['batch']}, workers, channels_last"
                diff = "—" if name == "plain" else f"{r['max_diff'][name]:.1e} (std {r['scale']:.2f})"
                rows.append([r["preset"], r["resolution"], r["images"], path, fmt_rate(rate),
                             f"{rate.median / plain:.2f}x", f"{r['wait'][name]:.0%}", util, diff])
        sections.append("### Encode: whole `encode_dataset` runs, images/s median (min–max)\n\n" + markdown_table(
            ["preset", "res", "images", "path", "images/s", "vs plain", "input wait", "GPU util",
             "max abs diff vs plain"], rows))
    if decode_rows:
        rows = [[r["preset"], r["resolution"], fmt_rate(r["rates"]["plain"]),
                 f"{fmt_rate(r['rates']['fast'])} (batch {r['batch']}, {r['precision']})",
                 f"{r['rates']['fast'].median / r['rates']['plain'].median:.2f}x", r["peak"]] for r in decode_rows]
        sections.append("### Decode, images/s median (min–max)\n\n" + markdown_table(
            ["preset", "res", "plain: fp32, batch 1, NCHW", "fast: channels_last", "fast/plain", "peak memory"], rows))
    if tiled_rows:
        rows = [[r["preset"], r["resolution"], fmt_rate(r["rates"]["tiled"]), r["peak"],
                 f"{r['psnr']:.1f}" if r["psnr"] is not None else "untiled does not fit"] for r in tiled_rows]
        sections.append("### Tiled decode\n\n" + markdown_table(
            ["preset", "res", "images/s", "peak memory", "seam PSNR tiled vs untiled (dB)"], rows))
    return "\n\n".join(sections)


def parse_sizes(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--presets", default="tiny-kl,kl-f8", help="comma-separated presets (default: tiny-kl,kl-f8)")
    parser.add_argument("--model", help="benchmark this diffusers VAE (folder or hub id) instead of random-weight "
                        "presets; --presets and --presets-decode are then ignored")
    parser.add_argument("--images", type=Path, help="image folder (e.g. /work/shared/data/cbsd68); default: generated")
    parser.add_argument("--num-images", type=int, default=16, help="images encoded per run (default: 16)")
    parser.add_argument("--resolutions", default="256", help="encode resolutions (default: 256)")
    parser.add_argument("--decode-resolutions", default="256,512", help="decode resolutions (default: 256,512)")
    parser.add_argument("--decode-images", type=int, default=4, help="latents decoded per run (default: 4)")
    parser.add_argument("--tiled-resolutions", default="", help="tiled decode resolutions, e.g. 1024,2048")
    parser.add_argument("--tile-size", type=int, default=512, help="tile size in pixels (default: 512)")
    parser.add_argument("--tile-overlap", type=float, default=0.25, help="tile overlap (default: 0.25)")
    parser.add_argument("--batch-size", type=int, help="fast encode batch (default: 32 on CUDA, 1 on CPU, where "
                        "larger batches fall out of cache)")
    parser.add_argument("--decode-batch-size", type=int, help="fast decode batch (default: 8 on CUDA, 1 on CPU)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                        help="fast encode DataLoader workers (default: cores - 1, at most 8)")
    parser.add_argument("--precision", default="auto", help="fast decode autocast: auto (bf16 on CUDA, fp32 on "
                        "CPU), fp32, bf16, fp16 (default: auto)")
    parser.add_argument("--fast-precisions", default="auto,bf16",
                        help="one fast encode row per autocast precision (default: auto,bf16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder in the fast path")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--presets-decode", help="presets for decode (default: --presets)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 1)
    args.decode_batch_size = args.decode_batch_size or (8 if device.type == "cuda" else 1)
    work = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    encode_sizes = parse_sizes(args.resolutions)  # '' = decode benchmarks only
    images = args.images or (generated_images(work / "images", args.num_images) if encode_sizes else None)
    presets = [args.model] if args.model else [p for p in args.presets.split(",") if p]
    for line in machine_description(device) + [f"load average at start: {os.getloadavg()[0]:.1f}",
                                                "images: " + str(args.images or "generated 480x320"),
                                                "command: python " + shlex.join(sys.argv)]:
        print(f"# {line}")
    print()
    try:
        encode_rows = [bench_encode(args, p, r, images, work, device) for p in presets for r in encode_sizes]
        decode_presets = presets if args.model else [p for p in (args.presets_decode or args.presets).split(",") if p]
        decode_rows = [bench_decode(args, p, r, device)
                       for p in decode_presets for r in parse_sizes(args.decode_resolutions)]
        tiled_rows = [bench_tiled_decode(args, p, r, device)
                      for p in decode_presets for r in parse_sizes(args.tiled_resolutions)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(encode_rows, decode_rows, tiled_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
