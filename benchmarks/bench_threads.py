"""CPU threads and DataLoader workers: the library's choice against torch's default, in the same run.

    python benchmarks/bench_threads.py --images /work/shared/data/cbsd68 --preset tiny-kl --resolution 256

Each setting runs ``latent-vae encode`` in a fresh interpreter (intra-op threads are fixed per
process) on the same images, with the command's default DataLoader workers, and reports the
images/s of its encode loop (read, preprocess, encode; the summary's ``images_per_second``):

- ``torch default``: ``OMP_NUM_THREADS`` = the CPUs this process may use, which is what torch picks on
  its own and what the library did before ``runtime.configure_cpu_threads`` (the plain baseline);
- ``library default``: no thread setting: ``configure_cpu_threads`` chooses (CPUs per process minus
  the DataLoader workers, at least 1);
- ``OMP_NUM_THREADS=1``: one thread, for reference.

Settings alternate run by run (so load drift hits all of them), after one untimed warm-up run each;
the table gives the median and the min–max of --repeats runs. On a shared machine run it under
``flock /work/bench.lock`` and say in the figures that the machine was shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch
from common import Stats, machine_description, markdown_table

from latent_vae.runtime import available_cpus, default_num_workers


def settings() -> Dict[str, Dict[str, str]]:
    cpus = str(available_cpus())
    return {"torch default": {"OMP_NUM_THREADS": cpus}, "library default": {},
            "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}


def encode_once(model: Path, images: str, resolution: int, batch_size: int, env_overrides: Dict[str, str]) -> float:
    """images/s of one ``latent-vae encode`` run in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(env_overrides)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "latent_vae", "encode", "--model", str(model), "--data", images,
                   "--output-dir", out, "--resolution", str(resolution), "--batch-size", str(batch_size)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"encode failed ({shlex.join(command)}):\n{done.stderr[-2000:]}")
        return json.loads((Path(out) / "summary.json").read_text())["images_per_second"]


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="image folder to encode")
    parser.add_argument("--preset", default="tiny-kl", help="architecture (random weights: speed only)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="encode --batch-size (default 1, encode's own choice on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from latent_vae.config import ModelConfig
    from latent_vae.models.loading import build_autoencoder

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_autoencoder(ModelConfig(preset=args.preset)).save_pretrained(model)
        runs = settings()
        for name, env in runs.items():  # warm-up: page cache, first-import costs
            print(f"warm-up: {name}", file=sys.stderr)
            encode_once(model, args.images, args.resolution, args.batch_size, env)
        samples: Dict[str, List[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name, env in runs.items():
                samples[name].append(encode_once(model, args.images, args.resolution, args.batch_size, env))
                print(f"repeat {repeat + 1}: {name}: {samples[name][-1]:.2f} img/s", file=sys.stderr)

    baseline = Stats(samples["torch default"]).median
    rows = []
    for name, values in samples.items():
        stats = Stats(values)
        threads = runs[name].get("OMP_NUM_THREADS") or f"auto: {max(1, available_cpus() - default_num_workers())}"
        rows.append([name, threads, default_num_workers(), f"{stats.median:.2f} ({stats.low:.2f}–{stats.high:.2f})",
                     f"{stats.median / baseline:.2f}×"])
    print("\n".join(f"- {line}" for line in machine_description(torch.device("cpu"))))
    print(f"- command: python benchmarks/bench_threads.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"- encode of {args.preset} (random weights) at {args.resolution}², batch {args.batch_size}, "
          f"{args.repeats} repeats; load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(markdown_table(["setting", "torch threads", "DataLoader workers", "images/s median (min–max)",
                          "vs torch default"], rows))


if __name__ == "__main__":
    main()
