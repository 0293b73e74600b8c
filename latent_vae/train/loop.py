"""The training loop for KL and VQ autoencoders on Accelerate.

``train()`` reads top to bottom: run directory and Accelerator, data, models and losses,
optimisers, resume, then the loop — for every step, the generator (autoencoder) update and
the discriminator update on the *same* detached reconstructions — and finally the export
of a stock diffusers model folder.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from tqdm.auto import tqdm

from ..config import Config, config_to_dict, save_config
from ..data.datasets import TrainBatchSampler, TrainDataset, ValidationDataset, collate
from ..data.sources import Failure, split_train_val
from ..distributed import all_reduce_sum_, world_size
from ..errors import TrainingError
from ..evaluate.metrics import psnr_per_image, ssim_per_image
from ..interop.export import compute_scaling_factor, save_diffusers_model, write_model_card
from ..losses import (
    AutoencoderLoss,
    PatchDiscriminator,
    PerceptualLoss,
    PerceptualWeightsUnavailable,
    build_lpips,
    build_regularizer,
)
from ..losses.kl import ACTIVE_UNIT_THRESHOLD
from ..losses.vq import normalize_codebook_
from ..models.loading import build_autoencoder
from ..models.stock import count_parameters, is_vq, reconstruct
from ..runtime import compile_modules
from . import checkpoint as ckpt
from .ema import EMA
from .trainable import TrainableAutoencoder

logger = logging.getLogger("latent_vae")


@dataclass
class RunSummary:
    output_dir: Path
    steps: int
    images_seen: int
    skipped_steps: int
    failed_inputs: int
    val_metrics: Dict[str, float] = field(default_factory=dict)
    initial_val_metrics: Dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    model_dir: Optional[Path] = None
    step_seconds: List[float] = field(default_factory=list)
    latent_drift: Optional[Dict[str, Any]] = None


# --------------------------------------------------------------------------- helpers


def effective_learning_rate(cfg: Config, num_processes: int) -> float:
    """``train.learning_rate`` × processes × batch × accumulation under ``lr_scaling=linear``."""
    if cfg.train.lr_scaling == "none":
        return cfg.train.learning_rate
    return cfg.train.learning_rate * num_processes * cfg.train.batch_size * cfg.train.grad_accum_steps


def lr_lambda(cfg: Config):
    warmup, total, schedule = cfg.train.lr_warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if schedule == "constant" or step < warmup:
            return scale
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return scale * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress)

    return factor


def check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"output directory {output_dir} is not writable ({err.strerror}); choose another --output-dir") from None


def setup_logging(output_dir: Path, is_main: bool) -> None:
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(console)
    if is_main:
        file = logging.FileHandler(output_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)


def load_perceptual(cfg: Config) -> Optional[PerceptualLoss]:
    """LPIPS with real weights, or None with a logged reason; errors before the first step."""
    reconstruction = cfg.reconstruction
    if reconstruction.perceptual_weight == 0:
        logger.info("perceptual loss: off (reconstruction.perceptual_weight=0)")
        return None
    try:
        network = build_lpips(reconstruction.perceptual_net, reconstruction.perceptual_weights)
    except PerceptualWeightsUnavailable as err:
        if reconstruction.perceptual_if_unavailable == "disable":
            logger.warning("perceptual loss: DISABLED for this run, because %s "
                           "(reconstruction.perceptual_if_unavailable=disable; the run continues with "
                           "reconstruction.perceptual_weight=0)", err)
            reconstruction.perceptual_weight = 0.0
            return None
        raise
    source = reconstruction.perceptual_weights or "torch hub cache"
    logger.info("perceptual loss: LPIPS-%s, weight %g, backbone weights from %s",
                reconstruction.perceptual_net, reconstruction.perceptual_weight, source)
    return PerceptualLoss(network)


class FailureLog:
    """Inputs that could not be decoded: counted once each and listed in ``skipped_inputs.txt``."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main, self.seen = path, is_main, set()

    def add(self, failures: List[Failure]) -> None:
        for failure in failures:
            if failure.key in self.seen:
                continue
            self.seen.add(failure.key)
            if self.is_main:
                logger.warning("skipped unreadable input %s: %s", failure.key, failure.reason)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(f"{failure.key}\t{failure.reason}\n")


class StopRequest:
    """SIGTERM/SIGINT (what SLURM sends before pre-emption) ask for a clean stop at the next
    step whose flags the host reads (every step, or every logging step with fused Adam); so
    does ``train.time_limit_minutes``."""

    def __init__(self, time_limit_minutes: Optional[float]):
        self.requested = False
        self.deadline = time.monotonic() + 60 * time_limit_minutes if time_limit_minutes else None
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def local_flag(self) -> bool:
        return self.requested or (self.deadline is not None and time.monotonic() > self.deadline)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class MetricWindow:
    """Sums of logged values between two logging steps, kept on the device (no host sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def add(self, values: Dict[str, Any]) -> None:
        """Tensors are summed where they live; Python numbers on the host (a host-to-device copy
        of a number every step would synchronise the device)."""
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self) -> Dict[str, Any]:
        """Means over the window and over processes, on the host."""
        out: Dict[str, Any] = {}
        for key in sorted(self.sums):
            total = torch.as_tensor(self.sums[key], dtype=torch.float32, device=self.device)
            mean = all_reduce_sum_(total / self.counts[key]) / world_size()
            out[key] = mean.cpu()
        self.sums, self.counts = {}, {}
        return out


def _scalars(values: Dict[str, Any]) -> Dict[str, float]:
    """Flatten logged values: vectors (per latent channel) become ``name/c<i>`` scalars.

    ``channel_activity`` also yields ``active_units``: channels whose posterior mean varies
    across inputs above the threshold.
    """
    out: Dict[str, float] = {}
    for key, value in values.items():
        value = torch.as_tensor(value).float().cpu()
        if value.dim() == 0:
            out[key] = float(value)
            continue
        for i, v in enumerate(value.tolist()):
            out[f"{key}/c{i}"] = v
        if key == "channel_activity":
            out["active_units"] = float((value > ACTIVE_UNIT_THRESHOLD).sum())
    return out


class CollapseMonitor:
    """Warns when latent channels stop carrying information (posterior collapse)."""

    def __init__(self):
        self.last_active: Optional[int] = None

    def check(self, scalars: Dict[str, float], step: int) -> None:
        if "active_units" not in scalars:
            return
        active = int(scalars["active_units"])
        channels = sum(1 for k in scalars if k.startswith("channel_activity/"))
        if active < channels and active != self.last_active:
            logger.warning("step %d: only %d of %d latent channels are active (posterior collapse?); "
                           "consider a lower regularizer.kl.weight or regularizer.kl.free_bits", step, active, channels)
        self.last_active = active


def image_grid(inputs: torch.Tensor, reconstructions: torch.Tensor):
    """Inputs (top row) above reconstructions (bottom row), as an HWC uint8 array."""
    import torchvision

    tiles = torch.cat([inputs, reconstructions]).float().clamp(-1, 1).add(1).mul(127.5)
    grid = torchvision.utils.make_grid(tiles.round().byte().cpu(), nrow=inputs.shape[0], padding=2)
    return grid.permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- the run


def train(config: Config, output_dir: str | Path, resume: Optional[str] = None) -> RunSummary:
    output_dir = Path(output_dir).resolve()
    cfg = config

    # ---------------------------------------------------------------- accelerator and run directory
    check_writable(output_dir)
    accelerator = Accelerator(
        # Several processes without CUDA (torchrun / accelerate launch on CPUs): gloo on CPU.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.logging.trackers or None,
        project_dir=str(output_dir / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    is_main, device = accelerator.is_main_process, accelerator.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed-size crops: pick the fastest convolution once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    setup_logging(output_dir, is_main)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every process

    checkpoint_path = ckpt.find_checkpoint(output_dir, resume) if resume else None
    if checkpoint_path is not None:
        _check_compatible(ckpt.load_metadata(checkpoint_path)["config"], cfg, checkpoint_path)

    # ---------------------------------------------------------------- data
    train_source, val_source, failures = split_train_val(cfg.data)
    failure_log = FailureLog(output_dir / "skipped_inputs.txt", is_main)
    failure_log.add(failures)
    train_dataset = TrainDataset(train_source, cfg.data)
    logger.info("data: %d training images from %s, %d validation images", len(train_source),
                train_source.name, 0 if val_source is None else len(val_source))

    # ---------------------------------------------------------------- models and losses
    vae = build_autoencoder(cfg.model)
    if cfg.model.trainable == "decoder":
        # Decoder-only fine-tuning: the latent space (encoder + quant_conv, codebook) is frozen,
        # so diffusion models trained on this VAE's latents stay valid.
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
    if cfg.model.gradient_checkpointing:
        # diffusers flags VQModel as unsupported, but its Encoder/Decoder are AutoencoderKL's,
        # which checkpoint correctly (tested); the flag is per instance and is not exported.
        vae._supports_gradient_checkpointing = True
        vae.enable_gradient_checkpointing()
    # Fine-tuning an existing VAE: keep its starting weights to report how far the latents moved.
    initial_vae = copy.deepcopy(vae).eval().requires_grad_(False) if cfg.model.pretrained else None
    model = TrainableAutoencoder(vae, build_regularizer(vae, cfg), cfg.reconstruction.logvar_init, cfg.reconstruction.learn_logvar)
    discriminator = PatchDiscriminator(3, cfg.gan.channels, cfg.gan.layers, cfg.gan.norm)
    if cfg.gan.norm == "sync_batch" and accelerator.num_processes > 1:
        discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    loss_fn = AutoencoderLoss(cfg.reconstruction, cfg.gan, load_perceptual(cfg)).to(device)
    ema = EMA(vae, cfg.train.ema_decay).to(device) if cfg.train.ema_decay else None
    if cfg.train.channels_last:
        for module in (model, discriminator, loss_fn):
            module.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        perceptual = [loss_fn.perceptual.network] if loss_fn.perceptual is not None else []
        compile_modules([vae.encoder, vae.decoder, discriminator, *perceptual], cfg.train.compile_backend)
    logger.info("model: %s %s, %s parameters (%s trainable); discriminator %s parameters",
                cfg.model.pretrained or cfg.model.preset, type(vae).__name__, f"{count_parameters(vae):,}",
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
                f"{count_parameters(discriminator):,}")

    # ---------------------------------------------------------------- optimisers
    lr = effective_learning_rate(cfg, accelerator.num_processes)
    betas = tuple(cfg.train.adam_betas)
    ae_params = [p for p in model.parameters() if p.requires_grad]
    d_params = list(discriminator.parameters())
    fused = True if cfg.train.fused_optimizer else None  # None: torch's default (foreach where supported)
    opt_ae = torch.optim.Adam(ae_params, lr=lr, betas=betas, weight_decay=cfg.train.weight_decay, fused=fused)
    opt_d = torch.optim.Adam(d_params, lr=lr * cfg.train.disc_lr_ratio, betas=betas,
                             weight_decay=cfg.train.weight_decay, fused=fused)
    sched_ae = torch.optim.lr_scheduler.LambdaLR(opt_ae, lr_lambda(cfg))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda(cfg))
    # One scaler for both losses (fp16 only; a no-op otherwise): both are scaled by the same
    # factor, each optimiser is unscaled exactly once, and a skipped step backs the scale off.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.mixed_precision == "fp16")
    logger.info("learning rate %.3g (train.learning_rate %.3g × %d processes × batch %d × accumulation %d, "
                "lr_scaling=%s)", lr, cfg.train.learning_rate, accelerator.num_processes,
                cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.lr_scaling)

    model, discriminator = accelerator.prepare(model, discriminator)
    model_core: TrainableAutoencoder = accelerator.unwrap_model(model)
    disc_core: nn.Module = accelerator.unwrap_model(discriminator)
    concat_real_fake = cfg.gan.norm != "sync_batch"

    # ---------------------------------------------------------------- resume
    step, skipped_steps = 0, 0
    if checkpoint_path is not None:
        step, skipped_steps = _restore(checkpoint_path, accelerator, model_core, disc_core, loss_fn, ema,
                                       opt_ae, opt_d, sched_ae, sched_d, scaler)
        logger.info("resumed from %s at step %d", checkpoint_path, step)
    cfg_dict = config_to_dict(cfg)
    if is_main:
        save_config(cfg, output_dir / "config.yaml")

    accum = cfg.train.grad_accum_steps
    images_per_step = cfg.train.batch_size * accum * accelerator.num_processes
    sampler = TrainBatchSampler(len(train_dataset), cfg.train.batch_size, cfg.train.seed,
                                accelerator.process_index, accelerator.num_processes, start_batch=step * accum)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
    )
    val_loader = _validation_loader(val_source, cfg, accelerator) if val_source is not None else None
    preview = _preview_batch(val_loader, train_dataset, device)

    if cfg.logging.trackers:
        accelerator.init_trackers(cfg.logging.project, config=_flat_hparams(cfg_dict))
    save_checkpoint = _checkpoint_writer(output_dir / "checkpoints", accelerator, model_core, disc_core, loss_fn,
                                         ema, opt_ae, opt_d, sched_ae, sched_d, scaler, cfg_dict)

    def inference_model(use_ema: bool = True):
        """What validation, previews and export use: the EMA weights if kept, as a stock model."""
        vae = ema.shadow if (ema is not None and use_ema) else model_core.vae
        if is_vq(vae) and cfg.regularizer.vq.l2_normalize:
            normalize_codebook_(vae.quantize.embedding)  # averaged/updated unit codes, back on the sphere
        return vae

    # ---------------------------------------------------------------- training loop
    initial_val_metrics: Dict[str, float] = {}
    if val_loader is not None and step == 0:
        initial_val_metrics = _validate(model_core.vae, val_loader, accelerator)
        accelerator.log({f"val/{k}": v for k, v in initial_val_metrics.items()}, step=0)
        logger.info("step 0 validation: %s", ", ".join(f"{k} {v:.4f}" for k, v in initial_val_metrics.items()))
    stop = StopRequest(cfg.train.time_limit_minutes)
    window = MetricWindow(device)
    collapse_monitor = CollapseMonitor()
    # Fused Adam skips a non-finite step on the device (``found_inf``), so the host need not wait
    # for the step's verdict; other optimisers (and fp16's gradient scaler) need it every step.
    skip_on_device = cfg.train.fused_optimizer and not scaler.is_enabled()
    skipped_on_device = torch.full((), float(skipped_steps), device=device)
    consecutive_on_device = torch.zeros((), device=device)
    consecutive_bad, reported_skipped, stop_now = 0, skipped_steps, False
    val_metrics: Dict[str, float] = {}
    last_saved = step if checkpoint_path is not None else -1
    data = iter(loader)
    progress = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    start_time, start_step = time.time(), step
    step_seconds: List[float] = []  # wall time per step: the flag agreement above synchronises the device
    step_start = time.perf_counter()
    stopped_early = False
    try:
        while step < cfg.train.max_steps:
            gan_active = loss_fn.gan_active(step)
            loss_values = []
            for micro in range(accum):
                batch = next(data)
                failure_log.add(batch["failures"])
                images = batch["pixel_values"].to(device, non_blocking=True)
                if cfg.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                seeds = batch["seeds"].tolist()
                with _no_sync(accelerator, [model, discriminator], sync=micro == accum - 1):
                    # Generator step. D is frozen, so L_G's gradient reaches the autoencoder only.
                    disc_core.requires_grad_(False)
                    with accelerator.autocast():
                        out = model(images, seeds, step)
                        g_loss, logs = loss_fn.generator_loss(
                            images, out.reconstructions, out.regularizer.loss, out.logvar, step,
                            disc_core if gan_active else None, model_core.last_layer)
                    scaler.scale(g_loss / accum).backward()
                    loss_values.append(g_loss.detach())
                    # Discriminator step on the same reconstructions, detached: no gradient to the autoencoder.
                    if gan_active:
                        disc_core.requires_grad_(True)
                        with accelerator.autocast():
                            d_loss, d_logs = loss_fn.discriminator_loss(discriminator, images, out.reconstructions,
                                                                        concat_real_fake)
                        scaler.scale(d_loss / accum).backward()
                        loss_values.append(d_loss.detach())
                        logs.update(d_logs)
                window.add(logs)
                window.add(out.regularizer.logs)

            # Non-finite guard: one decision for both optimisers and the EMA, shared by all processes.
            scaler.unscale_(opt_ae)
            if gan_active:
                scaler.unscale_(opt_d)
            ae_norm = _grad_norm(ae_params)
            d_norm = _grad_norm(d_params) if gan_active else torch.zeros((), device=device)
            checked = torch.stack([*(v.float() for v in loss_values), ae_norm, d_norm])
            flags = all_reduce_sum_(torch.stack([(~checked.isfinite().all()).float(),
                                                 torch.full((), float(stop.local_flag()), device=device)]))
            bad = (flags[0] > 0).float()
            skipped_on_device += bad
            consecutive_on_device = (consecutive_on_device + 1) * bad
            # The host reads the verdict when it must (see skip_on_device), and at logging and
            # checkpoint steps; otherwise this step runs without a host-device synchronisation.
            upcoming = step + 1
            verdict = None  # None: fused Adam decides on the device
            if not skip_on_device or upcoming % cfg.logging.log_every == 0 or upcoming == cfg.train.max_steps \
                    or upcoming % cfg.train.checkpoint_every == 0:
                status = torch.stack([bad, (flags[1] > 0).float(), skipped_on_device, consecutive_on_device]).tolist()
                stop_now, skipped_steps, consecutive_bad = bool(status[1]), int(status[2]), int(status[3])
                if not skip_on_device:
                    verdict = bool(status[0])
            if cfg.train.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(ae_params, cfg.train.max_grad_norm, ae_norm)
                if gan_active:
                    torch.nn.utils.clip_grads_with_norm_(d_params, cfg.train.max_grad_norm, d_norm)
            _optimizer_step(opt_ae, scaler, bad, verdict)
            sched_ae.step()  # the schedules follow the step counter, skipped steps included
            if gan_active:  # the discriminator's schedule counts its own steps from disc_start
                _optimizer_step(opt_d, scaler, bad, verdict)
                sched_d.step()
            if ema is not None:
                ema.update(model_core.vae, skip=bad)
            scaler.update()
            opt_ae.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            step_seconds.append(time.perf_counter() - step_start)
            step_start = time.perf_counter()

            if skipped_steps > reported_skipped:
                logger.warning("step %d: non-finite loss or gradient; %d step(s) skipped since the last report, for "
                               "both optimisers and the EMA (%d consecutive now, %d in total)", step - 1,
                               skipped_steps - reported_skipped, consecutive_bad, skipped_steps)
                reported_skipped = skipped_steps
            if consecutive_bad >= cfg.train.max_bad_steps:
                # Skipped steps changed nothing, so these weights are those from before the first bad step.
                save_checkpoint(step, skipped_steps)
                raise TrainingError(
                    f"{consecutive_bad} consecutive non-finite steps (last at step {step - 1}); stopped. "
                    f"The checkpoint at step {step} holds the weights from before the first bad step. "
                    "Lower the learning rate, enable train.max_grad_norm, or use bf16 instead of fp16.")
            if step % cfg.logging.log_every == 0 or step == cfg.train.max_steps:
                values = window.reduce()
                recent = step_seconds[-cfg.logging.log_every:]
                values.update(ae_grad_norm=ae_norm, lr=sched_ae.get_last_lr()[0], skipped_steps=skipped_steps,
                              seconds_per_step=sum(recent) / len(recent),
                              images_per_second=len(recent) * images_per_step / sum(recent))
                if gan_active:
                    values["d_grad_norm"] = d_norm
                scalars = _scalars(values)
                accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
                collapse_monitor.check(scalars, step)
                progress.set_postfix({k: f"{scalars[k]:.4g}" for k in ("nll", "pixel", "lpips", "g_loss", "d_loss") if k in scalars})
            if preview is not None and (step % cfg.logging.image_every == 0 or step == cfg.train.max_steps):
                _log_preview(preview, inference_model(), accelerator, output_dir, step)
            if val_loader is not None and (step % cfg.train.val_every == 0 or step == cfg.train.max_steps):
                val_metrics = _validate(inference_model(), val_loader, accelerator)
                accelerator.log({f"val/{k}": v for k, v in val_metrics.items()}, step=step)
                logger.info("step %d validation: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()))
            if step % cfg.train.checkpoint_every == 0:
                save_checkpoint(step, skipped_steps)
                last_saved = step
            if stop_now and step < cfg.train.max_steps:
                logger.warning("stop requested (signal or time limit) at step %d: writing a checkpoint and exiting; "
                               "continue with --resume latest", step)
                stopped_early = True
                break
    finally:
        progress.close()
        stop.restore()

    if last_saved != step:
        save_checkpoint(step, skipped_steps)
    elapsed = time.time() - start_time
    logger.info("trained %d steps in %.0fs (%.2f steps/s); %d steps skipped, %d inputs unreadable",
                step - start_step, elapsed, (step - start_step) / max(elapsed, 1e-9), skipped_steps,
                len(failure_log.seen))

    latent_drift_report = None
    if initial_vae is not None and val_loader is not None and not stopped_early:
        from ..evaluate.compare import latent_drift

        latent_drift_report = latent_drift(initial_vae.to(device), inference_model(),
                                           (b["pixel_values"] for b in val_loader if b["pixel_values"] is not None))
        accelerator.log({"val/latent_drift": latent_drift_report["relative_l2"],
                         "val/scaled_latent_drift": latent_drift_report["scaled_relative_l2"]}, step=step)
        logger.info("latent drift against the starting model (%s): relative L2 %.3g, scaled %.3g%s",
                    cfg.model.pretrained, latent_drift_report["relative_l2"], latent_drift_report["scaled_relative_l2"],
                    " (encoder frozen)" if cfg.model.trainable == "decoder" else "")

    # ---------------------------------------------------------------- export
    model_dir = None
    if not stopped_early:
        model_dir = _export(cfg, cfg_dict, inference_model(cfg.train.export_ema), train_dataset, accelerator,
                            output_dir, step, val_metrics, latent_drift_report)
    accelerator.end_training()
    summary = RunSummary(output_dir, step, step * images_per_step, skipped_steps, len(failure_log.seen), val_metrics,
                         initial_val_metrics, stopped_early, model_dir, step_seconds, latent_drift_report)
    if is_main:
        _write_summary(summary, output_dir)
    return summary


# --------------------------------------------------------------------------- pieces of the run


def _no_sync(accelerator: Accelerator, models: List[nn.Module], sync: bool):
    """Skip the DDP gradient all-reduce on all but the last micro-batch of an accumulation."""
    stack = contextlib.ExitStack()
    if not sync:
        for m in models:
            stack.enter_context(accelerator.no_sync(m))
    return stack


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, bad: torch.Tensor,
                    verdict: Optional[bool]) -> None:
    """Step unless the step is bad: on the device (fused Adam's ``found_inf``: the update, and its
    step count, are skipped by the kernel) when ``verdict`` is None, else on the host."""
    if verdict is None:
        optimizer.found_inf = bad
        optimizer.step()
        del optimizer.found_inf
    elif not verdict:
        scaler.step(optimizer)


def _grad_norm(params: List[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device)
    return torch.nn.utils.get_total_norm(grads, foreach=True).float()


def _flat_hparams(tree: Dict, prefix: str = "") -> Dict[str, Any]:
    """TensorBoard hparams accept only scalars and strings."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _check_compatible(saved: Dict, cfg: Config, path: Path) -> None:
    """A checkpoint is only resumed by a run with the same architecture."""
    current = config_to_dict(cfg)
    keys = ("preset", "pretrained", "subfolder", "config", "trainable")
    diffs = [f"model.{k}: checkpoint {saved['model'].get(k)!r} vs now {current['model'][k]!r}"
             for k in keys if saved["model"].get(k) != current["model"][k]]
    if diffs:
        raise ckpt.CheckpointError(f"checkpoint {path} was written by an incompatible config: " + "; ".join(diffs))


def _checkpoint_writer(root: Path, accelerator: Accelerator, model_core, disc_core, loss_fn, ema,
                       opt_ae, opt_d, sched_ae, sched_d, scaler, cfg_dict: Dict):
    def save(step: int, skipped_steps: int) -> None:
        # Every process reaches every barrier even when a write fails, then all agree to stop:
        # a full disk on one rank must not leave the others waiting forever.
        errors: List[str] = []
        if accelerator.is_main_process:
            _attempt(errors, ckpt.prepare_staging, root, step)
        accelerator.wait_for_everyone()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(accelerator.device)
        if not errors:
            _attempt(errors, ckpt.write_rank_file, root, step, accelerator.process_index, rng)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and not errors:
            weights = {
                "autoencoder": model_core.state_dict(),
                "discriminator": disc_core.state_dict(),
                "loss": {k: v for k, v in loss_fn.state_dict().items() if not k.startswith("perceptual.")},
            }
            if ema is not None:
                weights["ema"] = ema.state_dict()
            states = {"optimizer_ae": opt_ae.state_dict(), "optimizer_disc": opt_d.state_dict(),
                      "scheduler_ae": sched_ae.state_dict(), "scheduler_disc": sched_d.state_dict(),
                      "scaler": scaler.state_dict()}
            metadata = {"step": step, "skipped_steps": skipped_steps, "config": cfg_dict,
                        "num_processes": accelerator.num_processes}
            path = _attempt(errors, ckpt.commit, root, step, weights, states, metadata, accelerator.num_processes)
            if path is not None:
                ckpt.prune(root, cfg_dict["train"]["keep_checkpoints"])
                logger.info("checkpoint written: %s", path)
        failed = all_reduce_sum_(torch.tensor(float(bool(errors)), device=accelerator.device)).item() > 0
        if failed:
            if accelerator.is_main_process:
                ckpt.discard_staging(root)
            previous = ckpt.list_checkpoints(root)
            raise TrainingError(
                f"writing the checkpoint of step {step} failed ({'; '.join(errors) or 'on another process'}); "
                + (f"the previous checkpoint {previous[-1]} is intact: free space or fix the output "
                   "directory, then continue with --resume latest" if previous else "no earlier checkpoint exists"))

    return save


def _attempt(errors: List[str], function, *args):
    """Call ``function``; an OSError (disk full, permissions...) is recorded instead of raised."""
    try:
        return function(*args)
    except OSError as err:
        errors.append(f"{type(err).__name__}: {err}")
        return None


def _restore(path: Path, accelerator: Accelerator, model_core, disc_core, loss_fn, ema,
             opt_ae, opt_d, sched_ae, sched_d, scaler):
    try:
        model_core.load_state_dict(ckpt.load_tensors(path / "autoencoder.safetensors"))
        disc_core.load_state_dict(ckpt.load_tensors(path / "discriminator.safetensors"))
        loss_fn.load_state_dict(ckpt.load_tensors(path / "loss.safetensors"), strict=False)
        if ema is not None:
            ema_file = path / "ema.safetensors"
            if ema_file.is_file():
                ema.load_state_dict(ckpt.load_tensors(ema_file))
            else:
                ema.shadow.load_state_dict(model_core.vae.state_dict())
        states = ckpt.load_training_state(path)
        opt_ae.load_state_dict(states["optimizer_ae"])
        opt_d.load_state_dict(states["optimizer_disc"])
        for scheduler, optimizer, name in ((sched_ae, opt_ae, "scheduler_ae"), (sched_d, opt_d, "scheduler_disc")):
            # Restore the position in the schedule, but derive the learning rate from *this* run's
            # config: a run resumed with a new max_steps or learning rate follows the new schedule.
            base_lrs = list(scheduler.base_lrs)
            scheduler.load_state_dict(states[name])
            scheduler.base_lrs = base_lrs
            for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
        scaler.load_state_dict(states["scaler"])
    except pickle.UnpicklingError as err:
        raise ckpt.CheckpointError(f"checkpoint {path} was refused: its training state holds pickled objects "
                                   f"that could run code ({str(err).splitlines()[0]})") from None
    except (RuntimeError, ValueError, KeyError) as err:
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit this run: {err}") from None
    rng = ckpt.load_rank_file(path, accelerator.process_index)
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], accelerator.device)
    metadata = ckpt.load_metadata(path)
    return int(metadata["step"]), int(metadata.get("skipped_steps", 0))


def _validation_loader(source, cfg: Config, accelerator: Accelerator):
    dataset = ValidationDataset(source, cfg.data, cfg.data.val_crops)
    shard = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    workers = min(cfg.data.num_workers, 2)
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=cfg.train.batch_size, collate_fn=collate,
        num_workers=workers, persistent_workers=workers > 0,
    )


def _preview_batch(val_loader, train_dataset, device, count: int = 8) -> Optional[torch.Tensor]:
    """Fixed images for the reconstruction grids: the first validation crops (or training crops)."""
    if val_loader is not None:
        images = []
        for batch in val_loader:
            if batch["pixel_values"] is not None:
                images.append(batch["pixel_values"])
            if sum(len(i) for i in images) >= count:
                break
        if images:
            return torch.cat(images)[:count].to(device)
    items = [train_dataset[(i % len(train_dataset), i)]["pixel_values"] for i in range(count)]
    return torch.stack(items).to(device)


@torch.no_grad()
def _log_preview(preview: torch.Tensor, vae, accelerator: Accelerator, output_dir: Path, step: int) -> None:
    if not accelerator.is_main_process:
        return
    from PIL import Image

    with accelerator.autocast():
        recon = reconstruct(vae, preview)
    grid = image_grid(preview, recon)
    samples = output_dir / "samples"
    samples.mkdir(exist_ok=True)
    Image.fromarray(grid).save(samples / f"reconstructions-{step:08d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("reconstructions", grid, step, dataformats="HWC")
        else:
            tracker.log_images({"reconstructions": [grid]}, step=step)


@torch.no_grad()
def _validate(vae, loader, accelerator: Accelerator) -> Dict[str, float]:
    """Mean PSNR/SSIM of reconstructions (posterior mean) over the validation set, all processes."""
    was_training = vae.training
    vae.eval()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        if batch["pixel_values"] is None:
            continue
        images = batch["pixel_values"].to(accelerator.device)
        with accelerator.autocast():
            recon = reconstruct(vae, images)
        sums += torch.stack([psnr_per_image(recon, images).sum(), ssim_per_image(recon, images).sum(),
                             torch.tensor(float(len(images)), device=images.device)]).double()
    vae.train(was_training)
    all_reduce_sum_(sums)
    count = max(sums[2].item(), 1.0)
    return {"psnr": sums[0].item() / count, "ssim": sums[1].item() / count}


def _export(cfg: Config, cfg_dict: Dict, vae, train_dataset, accelerator: Accelerator,
            output_dir: Path, step: int, val_metrics: Dict[str, float], drift: Optional[Dict] = None) -> Path:
    """``<output>/model``: the (EMA) weights as a stock diffusers folder, scaling factor from data."""
    model_dir = output_dir / "model"
    if accelerator.is_main_process:
        vae.eval()
        notes = []
        if cfg.export.scaling_factor is not None:
            vae.register_to_config(scaling_factor=float(cfg.export.scaling_factor))
            notes.append("scaling_factor set by export.scaling_factor")
        elif cfg.model.pretrained:
            # A fine-tune keeps the latent normalisation diffusion models were trained with;
            # `latent-vae stats --write-to` recomputes it deliberately if the encoder moved.
            notes.append(f"scaling_factor kept from {cfg.model.pretrained}")
        elif cfg.export.scaling_images > 0:
            dataset = ValidationDataset(train_dataset.source, cfg.data)
            count = min(cfg.export.scaling_images, len(dataset))
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(count)),
                                                 batch_size=cfg.train.batch_size, collate_fn=collate)
            batches = (b["pixel_values"].to(accelerator.device) for b in loader if b["pixel_values"] is not None)
            with accelerator.autocast():
                factor = compute_scaling_factor(vae, batches, seed=cfg.train.seed)
            if factor is not None:
                vae.register_to_config(scaling_factor=factor)
                notes.append(f"scaling_factor = 1/std of latents over {count} training images")
        notes.append("exported weights: " + ("EMA" if cfg.train.ema_decay and cfg.train.export_ema else "raw (no EMA)"))
        if drift is not None:
            notes.append(f"latent drift against {cfg.model.pretrained} on the validation images: relative L2 "
                         f"{drift['relative_l2']:.3g} (scaled latents {drift['scaled_relative_l2']:.3g}); "
                         + ("the encoder was frozen (model.trainable=decoder)" if cfg.model.trainable == "decoder"
                            else "the encoder was trained: diffusion models trained on the starting latents may not transfer"))
        save_diffusers_model(vae, model_dir)
        write_model_card(model_dir, vae, cfg_dict, step, val_metrics, notes)
        logger.info("model exported to %s (load with diffusers %s.from_pretrained)", model_dir, type(vae).__name__)
    accelerator.wait_for_everyone()
    return model_dir


def _write_summary(summary: RunSummary, output_dir: Path) -> None:
    import json

    payload = {
        "steps": summary.steps, "images_seen": summary.images_seen, "skipped_steps": summary.skipped_steps,
        "failed_inputs": summary.failed_inputs, "val_metrics": summary.val_metrics,
        "initial_val_metrics": summary.initial_val_metrics,
        "stopped_early": summary.stopped_early, "latent_drift": summary.latent_drift,
        "model_dir": str(summary.model_dir) if summary.model_dir else None,
    }
    (output_dir / "summary.json").write_text(json.dumps(payload, indent=2))
