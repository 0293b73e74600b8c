"""Training-step throughput: the project's training loop against a plain baseline, same process.

Every variant runs full training steps — generator (autoencoder) and discriminator updates from
step 0 (``gan.start=0``), LPIPS-VGG, adaptive GAN weight, EMA of the weights — for one
preset, resolution and batch size, on the same images in the same order:

- ``plain``: what the common example scripts do (taming-transformers under Lightning, diffusers'
  research script): fp32, NCHW, no compile, default Adam; the autoencoder runs once for the
  generator loss and AGAIN, with LPIPS, for the discriminator step; per-parameter EMA loop;
  every loss ``.item()``-ed each step. Written here, on the same diffusers model, LPIPS and
  discriminator classes as the library, so the work is the same.
- ``loop``: ``latent_vae.training.train()`` with no fast-path flag (fp32, NCHW): the decoder
  output computed once and reused by both losses, one host synchronisation per step.
- flags added to ``loop`` with ``+``: ``bf16``, ``fp16`` (autocast), ``cl`` (channels_last),
  ``fused`` (fused Adam), ``compile`` (torch.compile), ``ckpt`` (gradient checkpointing), and
  ``fast``: the recommended flags, ``--precision`` + cl + fused (+ compile with ``--compile``),
  e.g. ``fast+ckpt``. ``--precision`` defaults to bf16 on CUDA and on CPUs with native bf16.

Timing: the wall time of the measured steps ÷ their number (data loading included), from
``RunSummary.step_seconds`` with warm-up steps dropped. The loop reads the device only at
logging steps (with fused Adam; every step otherwise), so logging runs every
gcd(warm-up, steps) steps: the warm-up's end and the run's end are synchronised, and the
figure is exact whether or not the host runs ahead of the device;
``--repeats`` runs per variant, interleaved across variants so machine noise spreads evenly;
the table gives the median over runs and the min–max range.

LPIPS: the real VGG16 ImageNet weights cannot be downloaded on an offline machine, so by default
a VGG16 file in torchvision's layout with random values is used (``--lpips-weights`` takes the
real file). LPIPS costs exactly the same whatever its weight values.

examples (see benchmarks/README.md for the recorded figures' commands):
  python benchmarks/bench_train.py --device cpu --preset tiny-kl --resolution 64 --batch-size 8 \
      --warmup 2 --steps 4 --repeats 3
  python benchmarks/bench_train.py --device cuda --preset kl-f8 --resolution 256 --batch-size 16 --compile
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from common import (
    PeakMemory,
    Stats,
    format_bytes,
    machine_description,
    markdown_table,
    practical_peak_tflops,
    quiet_library_logs,
    spec_sheet_bf16_tflops,
)

NEVER = 10**9  # a step interval that is never reached: no checkpoint, validation or image grid mid-run
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

FLAG_OVERRIDES = {
    "bf16": ["train.mixed_precision=bf16"],
    "fp16": ["train.mixed_precision=fp16"],
    "cl": ["train.channels_last=true"],
    "fused": ["train.fused_optimizer=true"],
    "compile": ["train.compile=true"],
    "ckpt": ["model.gradient_checkpointing=true"],
}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU computes bf16 convolutions natively (oneDNN), so bf16 autocast
    speeds training up instead of adding conversions."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_flags(precision: str, compile: bool) -> List[str]:
    """The recommended fast-path flags: autocast in ``precision``, channels_last, fused Adam, and
    torch.compile when asked (compiling takes minutes, worth it for long runs only)."""
    flags = [] if precision == "fp32" else [precision]
    flags += ["cl", "fused"]
    if compile:
        flags.append("compile")
    return flags


def peak_precision(flags: List[str], device: torch.device) -> str:
    """The precision whose peak a row's utilisation is measured against: on CUDA always the dense
    bf16 peak (the usual model-FLOPs-utilisation convention, and the issue's target); on CPU the
    peak of the row's own compute precision."""
    if device.type == "cuda" or "bf16" in flags:
        return "bf16"
    return "fp32"


def default_variants(device: torch.device) -> List[str]:
    if device.type == "cuda":
        return ["plain", "loop", "fast", "fast+ckpt"]
    return ["plain", "loop", "bf16", "cl", "fast", "fast+ckpt"]


def expand_variant(name: str, fast: List[str]) -> List[str]:
    """``fast+ckpt`` -> ``["bf16", "cl", "fused", "ckpt"]`` (flag names, in order, without repeats)."""
    flags: List[str] = []
    for part in name.split("+"):
        if part == "loop":
            continue
        for flag in fast if part == "fast" else [part]:
            if flag not in FLAG_OVERRIDES:
                raise SystemExit(f"error: unknown variant part '{part}' in '{name}'; use plain, loop, fast "
                                 f"or flags joined by '+': {', '.join(FLAG_OVERRIDES)}")
            if flag not in flags:
                flags.append(flag)
    return flags


# --------------------------------------------------------------------------- inputs


def random_vgg16_weights(folder: Path) -> Path:
    """A VGG16 backbone file in torchvision's layout with random values (what LPIPS loads)."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    path = folder / "vgg16-random.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    return path


def prepare_sample_photos(folder: Path, size: int) -> Path:
    """The photographs bundled with scikit-image, shorter side resized to the crop size, so
    decoding them stays a small part of a step."""
    from latent_vae.data.sources import sample_photo_sources
    from latent_vae.data.transforms import resize_shorter_side

    folder.mkdir(parents=True, exist_ok=True)
    source, _ = sample_photo_sources()
    for i in range(len(source)):
        resize_shorter_side(source.read(i), size).save(folder / f"photo_{i:02d}.png")
    return folder


def base_overrides(args, data_dir: Path, lpips_file: Path) -> List[str]:
    return [
        f"model.preset={args.preset}",
        f"data.path={data_dir}", f"data.resolution={args.resolution}", f"data.resize={args.resolution}",
        "data.val_images=0", f"data.num_workers={args.workers}",
        f"train.batch_size={args.batch_size}", f"train.max_steps={args.warmup + args.steps}",
        "train.ema_decay=0.999", f"train.checkpoint_every={NEVER}", f"train.val_every={NEVER}",
        "train.keep_checkpoints=1",
        "logging.trackers=[]", f"logging.log_every={math.gcd(args.warmup, args.steps)}",
        f"logging.image_every={NEVER}",
        "gan.start=0", "reconstruction.perceptual_weight=1.0", f"reconstruction.perceptual_weights={lpips_file}",
        "export.scaling_images=0",
    ]


# --------------------------------------------------------------------------- the plain baseline


class PlainBaseline:
    """The training step of the common example scripts, written out (benchmark-only code).

    Mirrors taming-transformers' ``training_step`` under Lightning: one ``training_step`` per
    optimiser, each running the autoencoder forward; the loss module computes L1 + LPIPS before
    branching on the optimiser, so the discriminator step recomputes the decoder AND LPIPS.
    Lightning's ``toggle_optimizer`` freezes the other model's parameters during each step.
    """

    def __init__(self, config, device: torch.device):
        from latent_vae.losses.discriminator import PatchDiscriminator
        from latent_vae.losses.perceptual import build_lpips
        from latent_vae.models.loading import build_autoencoder
        from latent_vae.models.stock import is_vq
        from latent_vae.train.state import effective_learning_rate

        torch.manual_seed(config.train.seed)
        self.rec, self.gan, self.reg = config.reconstruction, config.gan, config.regularizer
        self.vae = build_autoencoder(config.model).to(device).train()
        self.is_vq = is_vq(self.vae)
        self.disc = PatchDiscriminator(3, self.gan.channels, self.gan.layers, self.gan.norm).to(device)
        self.lpips = build_lpips(self.rec.perceptual_net, self.rec.perceptual_weights).to(device)
        lr, betas = effective_learning_rate(config, 1), tuple(config.train.adam_betas)
        self.opt_ae = torch.optim.Adam(self.vae.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=lr * config.train.disc_lr_ratio, betas=betas)
        self.ema_decay = config.train.ema_decay
        self.ema = [p.detach().clone() for p in self.vae.parameters()]

    def autoencode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions and the weighted regulariser (KL, or diffusers' codebook loss)."""
        if self.is_vq:
            quantized, codebook_loss, _ = self.vae.quantize(self.vae.encode(images).latents)
            return self.vae.decode(quantized, force_not_quantize=True).sample, self.reg.vq.weight * codebook_loss
        posterior = self.vae.encode(images).latent_dist
        reconstructions = self.vae.decode(posterior.sample()).sample
        return reconstructions, self.reg.kl.weight * posterior.kl().mean()

    def step(self, images: torch.Tensor) -> Dict[str, float]:
        from latent_vae.losses.discriminator import discriminator_loss, generator_loss

        # generator step (discriminator frozen)
        self.disc.requires_grad_(False)
        reconstructions, regularizer = self.autoencode(images)
        rec = (images - reconstructions).abs() + self.rec.perceptual_weight * self.lpips(images, reconstructions)
        nll = rec.sum() / images.shape[0]
        g_loss = generator_loss(self.gan.loss, self.disc(reconstructions))
        # λ as taming computes it: each loss back-propagated separately (through LPIPS and D) to the last layer
        last_layer = self.vae.decoder.conv_out.weight
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = self.gan.weight * torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0,
                                                    self.gan.adaptive_weight_max).detach()
        loss = nll + regularizer + weight * g_loss
        self.opt_ae.zero_grad()
        loss.backward()
        self.opt_ae.step()
        for average, param in zip(self.ema, self.vae.parameters()):
            average.mul_(self.ema_decay).add_(param.detach(), alpha=1 - self.ema_decay)
        self.disc.requires_grad_(True)

        # discriminator step: the autoencoder and LPIPS run again (autoencoder frozen)
        self.vae.requires_grad_(False)
        reconstructions, _ = self.autoencode(images)
        lpips_again = self.lpips(images, reconstructions)
        d_loss = discriminator_loss(self.gan.loss, self.disc(images), self.disc(reconstructions))
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
        self.vae.requires_grad_(True)
        return {"loss": loss.item(), "nll": nll.item(), "g_loss": g_loss.item(), "d_loss": d_loss.item(),
                "lpips": lpips_again.mean().item()}


def training_batches(config, device: torch.device):
    """The batches ``train()`` sees, in the same order (same dataset, sampler and seed)."""
    from latent_vae.data.datasets import TrainBatchSampler, TrainDataset, collate
    from latent_vae.data.sources import split_train_val

    source, _, _ = split_train_val(config.data)
    dataset = TrainDataset(source, config.data)
    workers = config.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=TrainBatchSampler(len(dataset), config.train.batch_size, config.train.seed),
        collate_fn=collate, num_workers=workers, pin_memory=config.data.pin_memory and device.type == "cuda",
        prefetch_factor=config.data.prefetch_factor if workers > 0 else None)
    for batch in loader:
        yield batch["pixel_values"].to(device, non_blocking=True)


# --------------------------------------------------------------------------- one measured run


def run_plain(config, device: torch.device, warmup: int) -> Tuple[float, int]:
    """Mean seconds per measured step of the plain baseline, and its peak memory."""
    seconds = []
    built = threading.Event()  # CPU memory is sampled from here on, as for train() (see run_loop)
    with PeakMemory(device, start_when=built.is_set) as memory:
        baseline = PlainBaseline(config, device)
        batches = training_batches(config, device)
        built.set()
        for _ in range(config.train.max_steps):
            start = time.perf_counter()
            baseline.step(next(batches))  # .item() in step() synchronises, as in the scripts
            seconds.append(time.perf_counter() - start)
        batches.close()
        del baseline
    return statistics.mean(seconds[warmup:]), memory.peak


def run_loop(config, device: torch.device, warmup: int, workdir: Path) -> Tuple[float, int]:
    """Mean seconds per measured step of one ``train()`` run, and its peak memory."""
    from latent_vae.runtime import reset_accelerate_state
    from latent_vae.train.loop import train

    reset_accelerate_state()
    output = Path(tempfile.mkdtemp(dir=workdir))
    # CPU memory is sampled from the moment the run has built its models and written config.yaml
    # (LPIPS' construction briefly allocates a whole VGG16) until it writes its final checkpoint.
    with PeakMemory(device, start_when=(output / "config.yaml").exists,
                    stop_when=(output / "checkpoints").exists) as memory:
        summary = train(config, output)
    shutil.rmtree(output, ignore_errors=True)
    return statistics.mean(summary.step_seconds[warmup:]), memory.peak


def count_step_flops(overrides: List[str], workdir: Path) -> int:
    """Model FLOPs of one training step of ``train()`` (fp32, no compile): the FLOPs of a 2-step
    run minus those of a 1-step run, so set-up, preview and export cancel out."""
    from torch.utils.flop_counter import FlopCounterMode

    from latent_vae.config import load_config
    from latent_vae.runtime import reset_accelerate_state
    from latent_vae.train.loop import train

    totals = []
    for steps in (1, 2):
        reset_accelerate_state()
        config = load_config(None, [*overrides, f"train.max_steps={steps}", "data.num_workers=0"])
        output = Path(tempfile.mkdtemp(dir=workdir))
        counter = FlopCounterMode(display=False)
        with counter:
            train(config, output)
        shutil.rmtree(output, ignore_errors=True)
        totals.append(counter.get_total_flops())
    return totals[1] - totals[0]


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-kl", help="model preset (default: tiny-kl)")
    parser.add_argument("--resolution", type=int, default=64, help="crop size in pixels (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="autocast dtype of the 'fast' variant (default: bf16 on cuda and on CPUs with "
                             "native bf16 (AVX512-BF16, AMX), else fp32)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per run (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (default: 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available; cpu hides the GPUs from this process")
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder (default: the scikit-image sample photos, resized to the crop size)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data.num_workers for every variant (default: 8 on cuda, 0 on cpu)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile to the 'fast' variant")
    parser.add_argument("--variants", default=None,
                        help="comma-separated: plain, loop, fast, or flags joined by '+' "
                             f"({', '.join(FLAG_OVERRIDES)}); default: plain,loop,fast,fast+ckpt on cuda, "
                             "plain,loop,bf16,cl,fast,fast+ckpt on cpu")
    parser.add_argument("--lpips-weights", type=Path, default=None,
                        help="torchvision VGG16 weights for LPIPS (default: a random-valued file; same cost)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and utilisation)")
    parser.add_argument("--verbose", action="store_true", help="keep the library's INFO logs")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises: train() must not find a GPU
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.precision is None:
        args.precision = "bf16" if args.device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    args.workers = args.workers if args.workers is not None else (8 if args.device.type == "cuda" else 0)
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --batch-size must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = args.device
    if not args.verbose:
        quiet_library_logs()
    from latent_vae.config import load_config
    from latent_vae.models.loading import build_autoencoder
    from latent_vae.models.stock import count_parameters
    from latent_vae.presets import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset '{args.preset}' (available: {', '.join(PRESETS)})")
    fast = fast_flags(args.precision, args.compile)
    variants = args.variants.split(",") if args.variants else default_variants(device)
    flags = {name: expand_variant(name, fast) for name in variants if name != "plain"}

    workdir = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        lpips_file = args.lpips_weights or random_vgg16_weights(workdir)
        data_dir = args.data or prepare_sample_photos(workdir / "photos", args.resolution)
        base = base_overrides(args, data_dir, lpips_file)
        config_of = {name: load_config(None, [*base, *(o for f in fl for o in FLAG_OVERRIDES[f])])
                     for name, fl in flags.items()}
        plain_config = load_config(None, base)

        precisions = {peak_precision(flags.get(name, []), device) for name in variants}
        peaks = {p: practical_peak_tflops(device, dtype) for p, dtype in DTYPES.items() if p in precisions}
        flops = None if args.no_flops else count_step_flops(base, workdir)

        step_seconds: Dict[str, List[float]] = {name: [] for name in variants}
        memory: Dict[str, List[int]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name in variants:
                if name == "plain":
                    seconds, peak_bytes = run_plain(plain_config, device, args.warmup)
                else:
                    seconds, peak_bytes = run_loop(config_of[name], device, args.warmup, workdir)
                step_seconds[name].append(seconds)
                memory[name].append(peak_bytes)
                print(f"[run {repeat + 1}/{args.repeats}] {name}: {seconds * 1e3:.1f} ms/step, "
                      f"peak {format_bytes(peak_bytes)}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    parameters = count_parameters(build_autoencoder(plain_config.model))
    print_report(args, variants, flags, step_seconds, memory, flops, peaks, parameters)
    return 0


def print_report(args, variants, flags, step_seconds, memory, flops, peaks, parameters) -> None:
    device = args.device
    spec = spec_sheet_bf16_tflops(device)
    gpu = device.type == "cuda"
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    memory_kind = "peak allocated" if gpu else "peak RSS Δ (sampled)"
    stats = {name: Stats(step_seconds[name]) for name in variants}
    plain = stats["plain"].median if "plain" in stats else None

    headers = ["variant", "flags", "images/s", "step ms", memory_kind, f"achieved {unit}", "util % (measured peak)"]
    if spec:
        headers.append("util % (spec sheet)")
    headers.append("× plain")
    rows = []
    for name in variants:
        s = stats[name]
        achieved = flops / s.median if flops else None
        precision = peak_precision(flags.get(name, []), device)
        row = [name, "+".join(flags.get(name, [])) or ("baseline" if name == "plain" else "none"),
               s.map(lambda t: args.batch_size / t).format(digits=2), s.format(scale=1e3),
               format_bytes(statistics.median(memory[name])),
               f"{achieved / scale:.3g}" if achieved else "n/a",
               f"{100 * achieved / (peaks[precision][0] * 1e12):.1f} ({precision})" if achieved else "n/a"]
        if spec:
            row.append(f"{100 * achieved / (spec * 1e12):.1f}" if achieved else "n/a")
        row.append(f"{plain / s.median:.2f}×" if plain else "n/a")
        rows.append(row)

    print(f"## bench_train: {args.preset} at {args.resolution}² px, batch {args.batch_size}, 1 process, {device.type}")
    print()
    for line in machine_description(device):
        print(f"- {line}")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- autoencoder parameters: {parameters:,}; data: {args.data or 'scikit-image sample photos'}, "
          f"{args.workers} DataLoader workers")
    print(f"- warm-up {args.warmup} + {args.steps} measured steps per run, {args.repeats} run(s) per variant "
          "(interleaved); median (min–max) over runs of each run's mean step")
    for precision, (peak, how) in peaks.items():
        print(f"- practical {precision} peak measured in this run: {peak * 1e12 / scale:.3g} {unit} ({how}, "
              "best repetition)")
    if spec:
        print(f"- spec sheet dense bf16 peak: {spec:g} TFLOP/s")
    if flops:
        print(f"- model FLOPs per step: {flops / 1e9:.4g} GFLOP (torch.utils.flop_counter on one step of train(): "
              "convolutions and matmuls, forward and backward, of the autoencoder, LPIPS and discriminator in the "
              "G and D updates, incl. the adaptive weight's gradients; not elementwise ops, norms, optimiser, EMA; "
              "recomputation by the plain baseline or checkpointing not counted)")
    lpips_source = (f"from {args.lpips_weights}" if args.lpips_weights else
                    "with random weights (the same cost as the real ones, which cannot be downloaded here)")
    print(f"- LPIPS: VGG16 backbone {lpips_source}")
    print()
    print(markdown_table(headers, rows))
    for name in variants:
        if name.endswith("+ckpt") and name[: -len("+ckpt")] in stats:
            without = name[: -len("+ckpt")]
            before, after = statistics.median(memory[without]), statistics.median(memory[name])
            slower = stats[name].median / stats[without].median - 1
            sign = "+" if after >= before else "−"
            change = f"{sign}{format_bytes(abs(after - before))}, {100 * (after / before - 1):+.0f}%"
            print(f"\ngradient checkpointing ({without} → {name}): peak memory {format_bytes(before)} → "
                  f"{format_bytes(after)} ({change}), step time "
                  f"{stats[without].median * 1e3:.1f} → {stats[name].median * 1e3:.1f} ms ({100 * slower:+.0f}%)")


if __name__ == "__main__":
    sys.exit(main())
