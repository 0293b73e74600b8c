"""Codebook health over training: usage, perplexity and dead codes of a VQ tokenizer with and
without EMA codebook updates and dead-code restart.

Four runs of the ``tiny-vq`` recipe (configs/tiny-vq.yaml) with a larger codebook (``--codes``)
on 64 px crops, identical except for the quantizer:

- ``plain``: codebook learned by gradient (‖sg[z] − e‖² + β‖z − sg[e]‖²), no restart;
- ``ema``: EMA codebook updates (``regularizer.vq.ema_decay``), no restart;
- ``restart``: gradient codebook, dead-code restart (``regularizer.vq.restart_dead``);
- ``ema+restart``: both.

Each run trains in chunks of ``--chunk`` steps, continuing with ``train(..., resume="auto")``
(resume is exact). After each chunk the exported model (``<run>/model``, a stock VQModel; the
weight EMA is off so it holds the current weights) encodes a fixed set of held-out crops:

- usage: % of codes hit by the held-out tokens (``latent_vae.models.stock.encode_to_indices``);
- perplexity: exp(entropy of the held-out code histogram) (``codebook_statistics``); at most the
  number of codes, and at most the number of held-out tokens;
- dead (train): codes the quantizer saw unused for ``regularizer.vq.dead_after`` training steps;
- val PSNR: the trainer's validation PSNR on the held-out images.

Held-out images: with ``--data``, ``--val-images`` images of the folder chosen by the trainer's
fixed split (never trained on); without it, the two validation photos bundled with scikit-image.

examples:
  python benchmarks/bench_codebook.py --data /work/shared/data/cbsd68
  python benchmarks/bench_codebook.py --data /path/to/images --codes 16384 --steps 2000 --chunk 250 \
      --batch-size 32 --eval-crops 256   # GPU
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from common import machine_description, markdown_table, quiet_library_logs

NEVER = 10**9  # a step interval that is never reached

VARIANTS = {
    "plain": ["regularizer.vq.ema_decay=null", "regularizer.vq.restart_dead=false"],
    "ema": ["regularizer.vq.ema_decay={ema}", "regularizer.vq.restart_dead=false"],
    "restart": ["regularizer.vq.ema_decay=null", "regularizer.vq.restart_dead=true"],
    "ema+restart": ["regularizer.vq.ema_decay={ema}", "regularizer.vq.restart_dead=true"],
}


def variant_overrides(args, name: str) -> List[str]:
    return [
        f"model.config.num_vq_embeddings={args.codes}",
        f"data.path={args.data if args.data else 'null'}", "data.resolution=64",
        f"data.val_images={args.val_images}", "data.num_workers=0",
        f"train.batch_size={args.batch_size}", "train.ema_decay=null", "train.keep_checkpoints=1",
        f"train.checkpoint_every={NEVER}", f"train.val_every={NEVER}",
        "logging.trackers=[]", f"logging.image_every={NEVER}", f"logging.log_every={NEVER}",
        "reconstruction.perceptual_weight=0", "export.scaling_images=0", f"regularizer.vq.dead_after={args.dead_after}",
        *(o.format(ema=args.ema_decay) for o in VARIANTS[name]),
    ]


def held_out_crops(config, crops_per_image: int) -> torch.Tensor:
    """Fixed random crops of the validation images the trainer holds out."""
    from latent_vae.data.datasets import ValidationDataset
    from latent_vae.data.sources import split_train_val

    _, val_source, _ = split_train_val(config.data)
    dataset = ValidationDataset(val_source, config.data, crops=crops_per_image)
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])


def code_histogram(vq, crops: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    from latent_vae.models.stock import encode_to_indices

    vq.eval()
    ids = torch.cat([encode_to_indices(vq, part).flatten() for part in crops.split(batch_size)])
    return torch.bincount(ids, minlength=vq.config.num_vq_embeddings)


def health_row(vq, crops: torch.Tensor) -> Dict[str, float]:
    from latent_vae.losses.vq import codebook_statistics

    counts = code_histogram(vq, crops)
    stats = codebook_statistics(counts)
    return {"usage": 100 * stats["usage"].item(), "perplexity": stats["perplexity"].item(),
            "unused": int((counts == 0).sum())}


def dead_codes_in_training(run_dir: Path, dead_after: int) -> int:
    """Codes the quantizer has seen unused for ``dead_after`` steps, from the latest checkpoint."""
    from latent_vae.train.checkpoint import list_checkpoints, load_tensors

    weights = load_tensors(list_checkpoints(run_dir / "checkpoints")[-1] / "autoencoder.safetensors")
    return int((weights["regularizer.steps_unused"] >= dead_after).sum())


def train_variant(args, name: str, crops: torch.Tensor, workdir: Path) -> List[Dict[str, float]]:
    """Train one variant chunk by chunk; a row of codebook statistics after each chunk."""
    from latent_vae.config import load_config
    from latent_vae.models.loading import load_autoencoder
    from latent_vae.runtime import reset_accelerate_state
    from latent_vae.train.loop import train

    run_dir = workdir / name.replace("+", "-")
    rows, trained_seconds = [], 0.0
    for end in range(args.chunk, args.steps + 1, args.chunk):
        reset_accelerate_state()
        config = load_config("tiny-vq", [*variant_overrides(args, name), f"train.max_steps={end}"])
        start = time.perf_counter()
        summary = train(config, run_dir, resume="auto")
        trained_seconds += time.perf_counter() - start
        row = {"step": end, **health_row(load_autoencoder(str(run_dir / "model")), crops),
               "dead": dead_codes_in_training(run_dir, args.dead_after),
               "psnr": summary.val_metrics.get("psnr", float("nan"))}
        rows.append(row)
        print(f"{name} step {end}: usage {row['usage']:.1f}%, perplexity {row['perplexity']:.0f}, "
              f"dead {row['dead']} ({trained_seconds:.0f} s)", file=sys.stderr)
    shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder (default: the scikit-image sample photos)")
    parser.add_argument("--codes", type=int, default=1024, help="codebook size (default: 1024)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per variant (default: 400)")
    parser.add_argument("--chunk", type=int, default=50, help="steps between measurements (default: 50)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--dead-after", type=int, default=50,
                        help="regularizer.vq.dead_after: steps unused before a code counts as dead (default: 50, "
                             "as configs/tiny-vq.yaml)")
    parser.add_argument("--ema-decay", type=float, default=0.99, help="regularizer.vq.ema_decay of the EMA variants (default: 0.99)")
    parser.add_argument("--val-images", type=int, default=8,
                        help="images of --data held out for evaluation (default: 8)")
    parser.add_argument("--eval-crops", type=int, default=32, help="64 px crops per held-out image (default: 32)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--verbose", action="store_true", help="keep the library's INFO logs")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.chunk < 1 or args.steps < args.chunk:
        parser.error("--chunk must be >= 1 and --steps >= --chunk")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        quiet_library_logs()
    from latent_vae.config import load_config
    from latent_vae.models.loading import build_autoencoder

    first = load_config("tiny-vq", variant_overrides(args, args.variants[0]))
    crops = held_out_crops(first, args.eval_crops)
    torch.manual_seed(first.train.seed)  # the initial weights every run starts from
    initial = health_row(build_autoencoder(first.model), crops)

    workdir = Path(tempfile.mkdtemp(prefix="bench_codebook-"))
    try:
        results = {name: train_variant(args, name, crops, workdir) for name in args.variants}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    tokens = len(crops) * (64 // 8) ** 2
    print(f"## bench_codebook: tiny-vq with {args.codes} codes, 64² px crops, batch {args.batch_size}")
    print()
    for line in machine_description(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        print(f"- {line}")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- data: {args.data or 'scikit-image sample photos'}; held out: {len(crops)} crops "
          f"({tokens} tokens, so at most {min(tokens, args.codes)} codes can be hit)")
    print(f"- recipe configs/tiny-vq.yaml: mean reduction, β = 0.25 on the commitment term, GAN from step "
          f"{first.gan.start}, no LPIPS (reconstruction.perceptual_weight=0), no weight EMA; "
          f"regularizer.vq.dead_after={args.dead_after}, EMA variants regularizer.vq.ema_decay={args.ema_decay}")
    print()
    rows = [["(all)", 0, f"{initial['usage']:.1f}", f"{initial['perplexity']:.1f}", initial["unused"], "–", "–"]]
    for name, chunks in results.items():
        rows += [[name, r["step"], f"{r['usage']:.1f}", f"{r['perplexity']:.1f}", r["unused"], r["dead"],
                  f"{r['psnr']:.2f}"] for r in chunks]
    print(markdown_table(["variant", "step", "usage %", "perplexity", "unused (held-out)", "dead (train)",
                          "val PSNR dB"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
