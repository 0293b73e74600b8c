"""Diffusability regularisers on real photographs: does a fine-tune with scale equivariance, EQ-VAE
or the VF loss give latents a diffusion model learns more easily, and what does it cost in
reconstruction? (docs/DIFFUSABILITY.md)

1. The photographs of ``--data`` are split (seeded) into ``--held-out`` evaluation photos and
   training photos (symlinks under ``--output-dir``; nothing is copied).
2. ``base``: the plain quickstart recipe (``configs/quickstart.yaml``: tiny-kl, 64 px crops, L1,
   KL 1e-6, GAN for the last third) trained for ``--base-steps`` on the training photos.
3. From ``base``, one fine-tune per variant at equal steps (``--steps``), same seed, data and
   learning rate, no GAN term (a fine-tune starts a fresh discriminator): ``plain`` (nothing
   added), ``scale-eq`` (``regularizer.scale_equivariance.weight=1``, factors 0.5/0.25),
   ``eq-vae`` (``regularizer.eq_vae.weight=1``, p = 0.5, EQ-VAE's scales and rotations) and, with
   ``--vf-backbone``, ``vf`` (``regularizer.vf.weight=0.1``, adaptive).
4. Every model's ``scaling_factor`` is set to 1/std of its latents on the training photos (what an
   export from scratch does), so the probe normalises every tokenizer alike.
5. Each model is evaluated on the held-out photos (``--eval-resolution``): PSNR, LPIPS-Alex when
   ``--lpips-weights`` is given, latent high-frequency fraction, equivariance PSNR; then
   ``latent-vae probe``'s denoiser is trained on each model's latents of the training photos.

A table per run goes to stdout (Markdown), everything to ``<output-dir>/results.json`` (including
each run's wall-clock seconds, which are not a timing benchmark: nothing here holds the bench lock).

examples:
  nice -n 5 python benchmarks/bench_diffusability.py --data /work/shared/data/cbsd68 /work/shared/data/mcmaster \
      --output-dir /tmp/diffusability
  python benchmarks/bench_diffusability.py --data /images --base-steps 20000 --steps 5000 --resolution 256 \
      --eval-resolution 256 --probe-steps 20000 --vf-backbone facebook/dinov2-large --output-dir runs/diff  # GPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from common import machine_description, markdown_table, quiet_library_logs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def split_photos(folders: List[Path], held_out: int, seed: int, output_dir: Path) -> Dict[str, Path]:
    files = sorted(p for folder in folders for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    random.Random(seed).shuffle(files)
    split = {"heldout": files[:held_out], "train": files[held_out:]}
    for name, members in split.items():
        target = output_dir / name
        target.mkdir(parents=True, exist_ok=True)
        for path in members:
            link = target / f"{path.parent.name}_{path.name}"
            if not link.exists():
                link.symlink_to(path.resolve())
    return {name: output_dir / name for name in split}


def train_run(overrides: List[str], run_dir: Path) -> float:
    from latent_vae.config import load_config
    from latent_vae.runtime import reset_accelerate_state
    from latent_vae.train.loop import train

    reset_accelerate_state()
    start = time.time()
    train(load_config("quickstart", overrides), run_dir, overwrite=True)
    return time.time() - start


def rescale(model_dir: Path, train_photos: Path, resolution: int, target: Path):
    """The model with scaling_factor = 1/std of its latents on the training photos, saved to ``target``."""
    from latent_vae.data.sources import open_source
    from latent_vae.evaluate.dataset import load_eval_images
    from latent_vae.interop.export import compute_scaling_factor
    from latent_vae.models.loading import load_autoencoder

    model = load_autoencoder(str(model_dir)).eval()
    source, _ = open_source(str(train_photos))
    images = load_eval_images(source, range(len(source)), resolution)
    with torch.no_grad():
        factor = compute_scaling_factor(model, images.split(16))
    model.register_to_config(scaling_factor=factor)
    model.save_pretrained(target)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="photo folders")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64, help="training crops (default: 64)")
    parser.add_argument("--eval-resolution", type=int, default=128, help="held-out evaluation size (default: 128)")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of every variant")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lpips-weights", help="torchvision AlexNet weights file: adds LPIPS-Alex (else not measured)")
    parser.add_argument("--vf-backbone", help="DINOv2 (or other AutoModel) hub id / folder: adds the VF variant")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared CPU more threads spin against each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_library_logs()
    torch.manual_seed(args.seed)

    from latent_vae.data.sources import open_source
    from latent_vae.evaluate.evaluation import evaluate
    from latent_vae.evaluate.options import EvalOptions
    from latent_vae.probe import ProbeOptions, format_table, run_probe
    from latent_vae.runtime import reset_accelerate_state

    out = args.output_dir
    folders = split_photos(args.data, args.held_out, args.seed, out)
    common = [f"data.path={folders['train']}", f"data.resolution={args.resolution}", "data.num_workers=0",
              "data.val_images=4", "logging.trackers=[]", "train.checkpoint_every=100000", "train.val_every=100000",
              "logging.image_every=100000", f"train.seed={args.seed}", "export.scaling_images=32",
              "reconstruction.perceptual_weight=0"]
    timings = {"base": train_run([*common, f"train.max_steps={args.base_steps}",
                                  f"gan.start={2 * args.base_steps // 3}"], out / "runs" / "base")}
    variants = {"plain": [], "scale-eq": ["regularizer.scale_equivariance.weight=1.0"],
                "eq-vae": ["regularizer.eq_vae.weight=1.0"]}
    if args.vf_backbone:
        variants["vf"] = ["regularizer.vf.weight=0.1", f"regularizer.vf.backbone={args.vf_backbone}"]
    for name, extra in variants.items():
        print(f"fine-tune {name} ...", file=sys.stderr)
        timings[name] = train_run([*common, f"model.pretrained={out / 'runs' / 'base' / 'model'}",
                                   f"train.max_steps={args.steps}", f"gan.start={args.steps + 1}", *extra],
                                  out / "runs" / name)

    models = {name: rescale(out / "runs" / name / "model", folders["train"], args.resolution, out / "models" / name)
              for name in ["base", *variants]}
    reset_accelerate_state()
    held_out, failures = open_source(str(folders["heldout"]))
    options = EvalOptions(resolution=args.eval_resolution, num_workers=0, fid=False, diffusability=True,
                          lpips=("alex",) if args.lpips_weights else (),
                          lpips_weights={"alex": args.lpips_weights} if args.lpips_weights else {},
                          grid_images=0, progress=False)
    evaluations = {name: evaluate(model, held_out, options, failures=failures) for name, model in models.items()}
    reset_accelerate_state()
    train_photos, _ = open_source(str(folders["train"]))
    probe = run_probe(list(models.items()), train_photos,
                      ProbeOptions(resolution=args.resolution, steps=args.probe_steps, seed=args.seed, held_out=16,
                                   samples=8),
                      out / "probe")
    probe_loss = {row["label"]: row["held_out_loss"] for row in probe["tokenizers"]}

    rows, results = [], {}
    for name, evaluation in evaluations.items():
        metrics, report = evaluation.metrics, evaluation.diffusability
        results[name] = {"metrics": metrics, "diffusability": report, "probe_held_out_loss": probe_loss[name],
                         "train_seconds": timings[name]}
        rows.append([name, f"{metrics['psnr']:.2f}",
                     f"{metrics['lpips_alex']:.4f}" if "lpips_alex" in metrics else "n/a",
                     f"{report['latent_hf_fraction']:.3f}", f"{report['image_hf_fraction']:.3f}",
                     f"{report['eq_psnr_mean']:.2f}", f"{report['equivariance']['scale_0.5']['psnr']:.2f}",
                     f"{report['equivariance']['rot90']['psnr']:.2f}", f"{probe_loss[name]:.4f}"])
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "results": results, "probe": probe}, indent=2))
    print("\n".join(f"- {line}" for line in machine_description(torch.device("cpu"))))
    print("- command: " + " ".join(sys.argv))
    print()
    print(markdown_table(["model", "PSNR", "LPIPS-Alex", "latent HF", "RGB HF", "EQ PSNR mean", "EQ x0.5",
                          "EQ rot90", "probe loss"], rows))
    print()
    print(format_table(probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
