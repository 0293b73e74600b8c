"""The diffusion probe: how well does the same small diffusion model learn each tokenizer's latents?

For every tokenizer, the images are encoded once (``models.stock.training_latents``: a seeded
posterior sample for KL, the pre-quantisation latents for VQ) and normalised with the model's own
factors (``models.stock.to_diffusion_latents``: scaling/shift or per-channel mean/std, what a
diffusers pipeline feeds its denoiser). Then one diffusers ``UNet2DModel`` (the same widths, depth,
seed, steps, batch and learning rate for every tokenizer; only its input/output channels follow
the latent) is trained as an ε-prediction DDPM (1000 steps, linear β 1e-4…0.02) for a fixed budget.

Reported per tokenizer: the held-out denoising loss, MSE(ε̂, ε) on held-out images at fixed
timesteps with fixed noise (the noise of image i, timestep t, draw d comes from its own seed, so
every tokenizer and every evaluation sees the same draws), its curve during training, a grid of
decoded DDIM samples from fixed noise, and optionally the FID of those samples against the held-out
images (InceptionV3 weights required; with a handful of samples it is only a rough signal).

Under ``accelerate launch`` every process draws the same global batch from the shared seed and
trains on its slice; DDP averages the gradients, so the update is the single-process one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .data.images import image_grid
from .data.sources import Failure, ImageSource
from .distributed import make_accelerator
from .errors import ConfigError, DataError, check_positive
from .evaluate.dataset import eval_loader
from .evaluate.options import EvalOptions
from .models.stock import Autoencoder, downsample_factor, from_diffusion_latents, to_diffusion_latents, training_latents
from .runtime import atomic_write_json
from .seeding import derive_seed

logger = logging.getLogger("latent_vae")

TRAIN_TIMESTEPS = 1000


@dataclass
class ProbeOptions:
    resolution: int = 64
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1.0e-3
    seed: int = 0
    held_out: int = 8                          # images kept out of training, for the denoising loss and FID
    timesteps: Tuple[int, ...] = (50, 250, 500, 750)
    noise_draws: int = 4                       # noise seeds per held-out image and timestep
    channels: Tuple[int, ...] = (32, 64)       # UNet widths per resolution level
    eval_every: int = 50
    samples: int = 8
    sample_steps: int = 50
    limit: Optional[int] = None
    fid: bool = False
    fid_weights: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("resolution", "steps", "batch_size", "learning_rate", "held_out", "noise_draws", "eval_every",
                     "sample_steps"):
            check_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        check_positive("--samples", self.samples, allow_zero=True)
        if not self.timesteps or not all(0 <= t < TRAIN_TIMESTEPS for t in self.timesteps):
            raise ConfigError(f"--timesteps {list(self.timesteps)}: give timesteps in [0, {TRAIN_TIMESTEPS})")
        if not self.channels:
            raise ConfigError("--channels: give at least one UNet width, e.g. --channels 32 64")
        for width in self.channels:
            check_positive("--channels", width)
            if width % 8:
                raise ConfigError(f"--channels {width}: widths must be multiples of 8 (GroupNorm with 8 groups)")


@dataclass
class ProbeResult:
    label: str
    latent_shape: List[int]
    latent_std: float                         # std of the normalised training latents (≈ 1 when well scaled)
    held_out_loss: float                      # mean over timesteps
    held_out_loss_by_timestep: Dict[int, float]
    curve: List[Dict[str, float]] = field(default_factory=list)  # step, train_loss, held_out_loss
    fid: Optional[float] = None
    samples: Optional[np.ndarray] = None      # HWC uint8 row of decoded samples (main process)


def load_images(source: ImageSource, options: EvalOptions) -> Tuple[torch.Tensor, List[Failure]]:
    """Every readable image, centre-cropped (evaluation's reading: failures reported, not raised)."""
    pixels, failures = [], []
    for batch in eval_loader(source, range(len(source)), options, torch.device("cpu")):
        failures += batch["failures"]
        if batch["pixel_values"] is not None:
            pixels.append(batch["pixel_values"])
    if not pixels:
        raise DataError("no readable images for the probe")
    return torch.cat(pixels), failures


def split_images(count: int, held_out: int, seed: int) -> Tuple[List[int], List[int]]:
    """(train, held-out) indices: a seeded permutation, the same for every tokenizer."""
    if held_out >= count - 1:
        raise DataError(f"{count} readable images cannot hold out {held_out}: the probe needs at least 2 training "
                        f"images; use a smaller --held-out or more images")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held_out:]), sorted(order[:held_out])


@torch.no_grad()
def encode_normalised(model: Autoencoder, images: torch.Tensor, seed: int, device, batch_size: int = 16
                      ) -> torch.Tensor:
    """Normalised training latents of ``images`` (image i's posterior noise from its own seed)."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        latents = []
        for offset, image in enumerate(batch):
            generator = torch.Generator(device=device).manual_seed(derive_seed(seed, 3, start + offset))
            latents.append(training_latents(model, image[None], generator))
        chunks.append(to_diffusion_latents(model, torch.cat(latents).float()).cpu())
    return torch.cat(chunks)


def build_denoiser(channels: int, size: int, widths: Sequence[int], seed: int):
    """The probe's UNet: ``widths`` levels of one ResNet block each, plain down/up blocks."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    levels = len(widths)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=tuple(widths), down_block_types=("DownBlock2D",) * levels,
                       up_block_types=("UpBlock2D",) * levels, norm_num_groups=8)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="epsilon")


def _seeded_noise(shape: Sequence[int], *entropy: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(derive_seed(*entropy)))


@torch.no_grad()
def held_out_loss(denoiser, latents: torch.Tensor, options: ProbeOptions, device) -> Dict[int, float]:
    """MSE(ε̂, ε) per fixed timestep over held-out latents × ``noise_draws`` fixed noises."""
    scheduler, losses = _scheduler(), {}
    was_training = denoiser.training
    denoiser.eval()
    for t in options.timesteps:
        total, count = 0.0, 0
        for draw in range(options.noise_draws):
            noise = torch.stack([_seeded_noise(latents.shape[1:], options.seed, 7, i, t, draw)
                                 for i in range(len(latents))])
            timesteps = torch.full((len(latents),), t, dtype=torch.long)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            predicted = denoiser(noisy.to(device), timesteps.to(device)).sample.float().cpu()
            total += F.mse_loss(predicted, noise, reduction="sum").item()
            count += noise.numel()
        losses[t] = total / count
    denoiser.train(was_training)
    return losses


@torch.no_grad()
def decoded_samples(denoiser, model: Autoencoder, shape: Sequence[int], options: ProbeOptions, device) -> torch.Tensor:
    """DDIM samples from fixed noise, decoded by the tokenizer: (N, 3, H, W) in [-1, 1]."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="epsilon",
                              clip_sample=False)
    scheduler.set_timesteps(options.sample_steps)
    latents = torch.stack([_seeded_noise(shape, options.seed, 11, i) for i in range(options.samples)]).to(device)
    denoiser.eval()
    for t in scheduler.timesteps:
        latents = scheduler.step(denoiser(latents, t).sample, t, latents).prev_sample
    return model.decode(from_diffusion_latents(model, latents)).sample.float().clamp(-1, 1).cpu()


def probe_one(label: str, model: Autoencoder, images: torch.Tensor, train_index: List[int], held_index: List[int],
              options: ProbeOptions, accelerator, fid_extractor=None) -> ProbeResult:
    """Train the probe's denoiser on ``model``'s latents and measure it (module doc)."""
    from tqdm.auto import tqdm

    device = accelerator.device
    model.to(device).eval().requires_grad_(False)
    latents = encode_normalised(model, images, options.seed, device)
    train_latents, held_latents = latents[train_index], latents[held_index]
    denoiser = build_denoiser(latents.shape[1], latents.shape[-1], options.channels, options.seed)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=options.learning_rate, weight_decay=0.0)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    scheduler = _scheduler()
    generator = torch.Generator().manual_seed(derive_seed(options.seed, 5))  # same stream for every tokenizer
    rank, world = accelerator.process_index, accelerator.num_processes
    curve, recent = [], []
    progress = tqdm(range(options.steps), desc=f"probe {label}", unit="step", dynamic_ncols=True,
                    disable=not accelerator.is_main_process)
    for step in progress:
        rows = torch.randint(len(train_latents), (options.batch_size,), generator=generator)
        noise = torch.randn(options.batch_size, *latents.shape[1:], generator=generator)
        timesteps = torch.randint(TRAIN_TIMESTEPS, (options.batch_size,), generator=generator)
        mine = slice(rank, None, world)  # this process's share of the global batch
        noisy = scheduler.add_noise(train_latents[rows[mine]], noise[mine], timesteps[mine])
        predicted = denoiser(noisy.to(device), timesteps[mine].to(device)).sample
        loss = F.mse_loss(predicted.float(), noise[mine].to(device))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(accelerator.gather(loss.detach()[None]).mean().item())  # the global batch's loss
        if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
            held = held_out_loss(accelerator.unwrap_model(denoiser), held_latents, options, device)
            curve.append({"step": step + 1, "train_loss": float(np.mean(recent)),
                          "held_out_loss": float(np.mean(list(held.values())))})
            progress.set_postfix(held_out=f"{curve[-1]['held_out_loss']:.4f}")
            recent = []
    progress.close()
    unwrapped = accelerator.unwrap_model(denoiser)
    held = held_out_loss(unwrapped, held_latents, options, device)
    result = ProbeResult(label, list(latents.shape[1:]), float(train_latents.std()), float(np.mean(list(held.values()))),
                         held, curve)
    if accelerator.is_main_process and (options.samples or fid_extractor is not None):
        samples = decoded_samples(unwrapped, model, latents.shape[1:], options, device)
        result.samples = np.asarray(image_grid(samples, columns=len(samples))) if options.samples else None
        if fid_extractor is not None:
            result.fid = sample_fid(samples, images[held_index], fid_extractor)
    model.cpu()
    return result


def sample_fid(samples: torch.Tensor, references: torch.Tensor, extractor) -> Optional[float]:
    """FID of decoded samples against held-out images (torchmetrics; needs ≥ 2 of each)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .evaluate.metrics import to_unit_range

    if len(samples) < 2 or len(references) < 2:
        return None
    fid = FrechetInceptionDistance(feature=extractor, input_img_size=(3, *samples.shape[-2:]))
    fid.update(to_unit_range(references).mul(255).round().to(torch.uint8), real=True)
    fid.update(to_unit_range(samples).mul(255).round().to(torch.uint8), real=False)
    return float(fid.compute())


def run_probe(models: Sequence[Tuple[str, Autoencoder]], source: ImageSource, options: ProbeOptions,
              output_dir: Path, known_failures: Sequence[Failure] = (), fid_extractor=None) -> Dict[str, Any]:
    """Probe every tokenizer; write ``probe.json``, ``loss_curves.png`` and ``samples.png`` to
    ``output_dir`` (main process); return the JSON payload. ``fid_extractor`` replaces InceptionV3
    for ``options.fid`` (uint8 images -> features, as in ``evaluate.networks.MetricNetworks``)."""
    accelerator = make_accelerator()
    for label, model in models:
        factor = downsample_factor(model)
        if options.resolution % (factor * 2 ** (len(options.channels) - 1)):
            raise ConfigError(f"--resolution {options.resolution} is not a multiple of {label}'s downsampling factor "
                              f"{factor} × the UNet's {2 ** (len(options.channels) - 1)}: choose e.g. "
                              f"{factor * 2 ** (len(options.channels) - 1) * 8}")
    if options.limit is not None:
        source = source.subset(range(min(options.limit, len(source))))
    images, failures = load_images(source, EvalOptions(resolution=options.resolution, num_workers=0, progress=False))
    failures = [*known_failures, *failures]
    train_index, held_index = split_images(len(images), options.held_out, options.seed)
    extractor = fid_extractor if options.fid else None
    if options.fid and extractor is None:
        from .evaluate.networks import load_inception

        extractor = load_inception(options.fid_weights)
    results = [probe_one(label, model, images, train_index, held_index, options, accelerator, extractor)
               for label, model in models]
    payload = {
        "settings": {**asdict(options), "images": len(images), "train_images": len(train_index),
                     "held_out_images": len(held_index), "processes": accelerator.num_processes,
                     "denoiser": "diffusers UNet2DModel, epsilon prediction, DDPM linear betas 1e-4..0.02, "
                                 f"{TRAIN_TIMESTEPS} steps; AdamW; samples: DDIM"},
        "skipped_inputs": [{"key": f.key, "reason": f.reason} for f in failures],
        "tokenizers": [{k: v for k, v in asdict(r).items() if k != "samples"} for r in results],
    }
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "probe.json", payload)
        plot_curves(results, output_dir / "loss_curves.png")
        rows = [r.samples for r in results if r.samples is not None]
        if rows:
            from PIL import Image

            width = max(row.shape[1] for row in rows)
            padded = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
            Image.fromarray(np.concatenate(padded)).save(output_dir / "samples.png")
    accelerator.wait_for_everyone()
    return payload


def plot_curves(results: Sequence[ProbeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=110)
    for result in results:
        steps = [point["step"] for point in result.curve]
        line, = axis.plot(steps, [p["held_out_loss"] for p in result.curve], marker="o", markersize=3,
                          label=f"{result.label} held-out")
        axis.plot(steps, [p["train_loss"] for p in result.curve], linestyle=":", color=line.get_color(),
                  label=f"{result.label} train")
    axis.set_xlabel("denoiser training step")
    axis.set_ylabel("MSE(ε̂, ε)")
    axis.set_title("diffusion probe: denoising loss")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def format_table(payload: Dict[str, Any]) -> str:
    """One line per tokenizer: latent shape, normalised std, held-out loss (mean and per timestep), FID."""
    timesteps = payload["settings"]["timesteps"]
    head = f"{'tokenizer':<28}{'latent':>12}{'std':>7}{'held-out':>10}" + "".join(f"{'t=' + str(t):>9}" for t in timesteps)
    lines = [head + f"{'FID':>9}"]
    for row in payload["tokenizers"]:
        by_t = row["held_out_loss_by_timestep"]
        fid = f"{row['fid']:9.2f}" if row["fid"] is not None else f"{'-':>9}"
        lines.append(f"{row['label'][:27]:<28}{'x'.join(map(str, row['latent_shape'])):>12}{row['latent_std']:7.3f}"
                     f"{row['held_out_loss']:10.4f}" + "".join(f"{by_t[t]:9.4f}" for t in timesteps) + fid)
    if any(math.fabs(row["latent_std"] - 1) > 0.5 for row in payload["tokenizers"]):
        lines.append("note: a normalised latent std far from 1 means the model's scaling_factor does not fit these "
                     "images; the losses then also measure that (latent-vae stats --write-to fixes the factor)")
    return "\n".join(lines)
