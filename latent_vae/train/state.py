"""``TrainState``: everything a run trains and everything a checkpoint restores, in one object.

``build_state`` makes it from the config — the trainable autoencoder with its regulariser, the
discriminator, the loss module (LPIPS with real weights or off), the EMA, both Adam optimisers
with their learning-rate schedules, the gradient scaler — and prepares the two trained modules
for distributed training. ``state_dict()`` / ``load_state_dict()`` are what a checkpoint writes
and reads (``checkpoint.py`` owns the files).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError, PerceptualWeightsUnavailable
from ..losses import build_regularizer
from ..losses.autoencoder_loss import AutoencoderLoss
from ..losses.discriminator import PatchDiscriminator
from ..losses.perceptual import PerceptualLoss, build_lpips
from ..losses.vq import normalize_codebook_
from ..models.stock import Autoencoder, count_parameters, is_vq
from ..runtime import compile_modules
from .ema import EMA
from .rollback import StepSnapshot
from .trainable import TrainableAutoencoder

logger = logging.getLogger("latent_vae")

Schedule = torch.optim.lr_scheduler.LambdaLR


@dataclass
class TrainState:
    """The trained modules (unwrapped: what is saved), their optimisers and schedules, the scaler
    and the EMA; plus the DDP-wrapped modules that training forward passes go through (the
    modules themselves in a single process)."""

    autoencoder: TrainableAutoencoder
    discriminator: nn.Module
    loss: AutoencoderLoss  # its buffers: the LeCam anchors
    opt_ae: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_ae: Schedule
    sched_d: Schedule
    scaler: torch.amp.GradScaler
    ema: Optional[EMA]
    wrapped_autoencoder: nn.Module
    wrapped_discriminator: nn.Module
    unit_codes: bool = False  # regularizer.vq.l2_normalize: codes live on the unit sphere
    frozen_codebook: bool = False  # model.trainable=decoder: the codebook is part of the frozen latent space
    snapshot: StepSnapshot = field(default_factory=StepSnapshot)  # what a bad step is rolled back to

    def inference_model(self, use_ema: bool = True) -> Autoencoder:
        """What validation, previews and export use: the EMA weights if kept, as a stock model."""
        vae = self.ema.shadow if (self.ema is not None and use_ema) else self.autoencoder.vae
        if is_vq(vae) and self.unit_codes and not self.frozen_codebook:
            normalize_codebook_(vae.quantize.embedding)  # averaged/updated unit codes, back on the sphere
        return vae

    def step_tensors(self) -> List[torch.Tensor]:
        """Every tensor a training step may change before its verdict: both optimisers' parameters and
        state, the buffers of the trained modules and of the loss (VQ codebook statistics, usage
        counters and restart buffer, batch-norm statistics, LeCam anchors: forward passes update
        them), and the VQ codebook, which EMA updates and restarts write outside the optimiser."""
        tensors = [t for opt in (self.opt_ae, self.opt_d) for group in opt.param_groups for p in group["params"]
                   for t in (p, *(v for v in opt.state.get(p, {}).values() if torch.is_tensor(v)))]
        tensors += [*self.autoencoder.buffers(), *self.discriminator.buffers()]
        tensors += [b for name, b in self.loss.named_buffers() if not name.startswith("perceptual.")]
        if is_vq(self.autoencoder.vae):
            tensors.append(self.autoencoder.vae.quantize.embedding.weight)
        unique = {id(t): t for t in tensors}  # a trained codebook is also an optimiser parameter
        return list(unique.values())

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """``weights``: name -> tensors (one safetensors file each); ``training_state``: the
        optimiser, schedule and scaler states (one ``training_state.pt``)."""
        weights = {
            "autoencoder": self.autoencoder.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            # the perceptual network is fixed, loaded from its own weights: not saved
            "loss": {k: v for k, v in self.loss.state_dict().items() if not k.startswith("perceptual.")},
        }
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        training_state = {"optimizer_ae": self.opt_ae.state_dict(), "optimizer_disc": self.opt_d.state_dict(),
                          "scheduler_ae": self.sched_ae.state_dict(), "scheduler_disc": self.sched_d.state_dict(),
                          "scaler": self.scaler.state_dict()}
        return {"weights": weights, "training_state": training_state}

    def load_state_dict(self, state_dict: Dict[str, Dict[str, Any]]) -> None:
        weights, training_state = state_dict["weights"], state_dict["training_state"]
        self.autoencoder.load_state_dict(weights["autoencoder"])
        self.discriminator.load_state_dict(weights["discriminator"])
        self.loss.load_state_dict(weights["loss"], strict=False)
        if self.ema is not None:
            if "ema" in weights:
                self.ema.load_state_dict(weights["ema"])
            else:  # a run without EMA resumed with it: the average starts at the current weights
                self.ema.shadow.load_state_dict(self.autoencoder.vae.state_dict())
        self.opt_ae.load_state_dict(training_state["optimizer_ae"])
        self.opt_d.load_state_dict(training_state["optimizer_disc"])
        _load_schedule(self.sched_ae, self.opt_ae, training_state["scheduler_ae"])
        _load_schedule(self.sched_d, self.opt_d, training_state["scheduler_disc"])
        self.scaler.load_state_dict(training_state["scaler"])


def _load_schedule(scheduler: Schedule, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Restore the position in the schedule, but derive the learning rate from *this* run's
    config: a run resumed with a new max_steps or learning rate follows the new schedule."""
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(state)
    scheduler.base_lrs = base_lrs
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


# --------------------------------------------------------------------------- building it


def build_state(cfg: Config, vae: Autoencoder, accelerator) -> TrainState:
    """The state of a fresh run around ``vae`` (see ``trainable.build_trainable_vae``), on the
    accelerator's device, its two trained modules prepared (DDP with several processes)."""
    model = TrainableAutoencoder(vae, build_regularizer(vae, cfg), cfg.reconstruction.logvar_init,
                                 cfg.reconstruction.learn_logvar)
    return assemble_state(cfg, model, accelerator, cfg.model.pretrained or cfg.model.preset)


def assemble_state(cfg: Config, model: nn.Module, accelerator, description: str) -> TrainState:
    """The state around ``model``: a module whose ``.vae`` is the stock model (averaged by the EMA,
    exported), whose ``.logvar`` and ``.last_layer`` the loss reads, and whose forward pass returns a
    ``trainable.AutoencoderOutput`` (``TrainableAutoencoder``, or ``distill``'s student). Everything
    else — discriminator, loss, EMA, optimisers, schedules, scaler, preparation — comes from ``cfg``."""
    device, vae = accelerator.device, model.vae
    discriminator = PatchDiscriminator(3, cfg.gan.channels, cfg.gan.layers, cfg.gan.norm)
    if cfg.gan.norm == "sync_batch" and accelerator.num_processes > 1:
        discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    loss = AutoencoderLoss(cfg.reconstruction, cfg.gan, load_perceptual(cfg)).to(device)
    ema = EMA(vae, cfg.train.ema_decay).to(device) if cfg.train.ema_decay else None
    if cfg.train.channels_last:
        for module in (model, discriminator, loss):
            module.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        perceptual = [loss.perceptual.network] if loss.perceptual is not None else []
        compile_modules([vae.encoder, vae.decoder, discriminator, *perceptual], cfg.train.compile_backend)
    logger.info("model: %s %s, %s parameters (%s trainable); discriminator %s parameters",
                description, type(vae).__name__, f"{count_parameters(vae):,}",
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
                f"{count_parameters(discriminator):,}")

    lr = effective_learning_rate(cfg, accelerator.num_processes)
    _check_step_size(lr * max(1.0, cfg.train.disc_lr_ratio), cfg.train.adam_betas[0])
    betas = tuple(cfg.train.adam_betas)
    fused = True if cfg.train.fused_optimizer else None  # None: torch's default (foreach where supported)
    adam = dict(betas=betas, weight_decay=cfg.train.weight_decay, amsgrad=cfg.train.amsgrad, fused=fused)
    opt_ae = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, **adam)
    opt_d = torch.optim.Adam(list(discriminator.parameters()), lr=lr * cfg.train.disc_lr_ratio, **adam)
    sched_ae, sched_d = Schedule(opt_ae, lr_lambda(cfg)), Schedule(opt_d, lr_lambda(cfg))
    # One scaler for both losses (fp16 only; a no-op otherwise): both are scaled by the same
    # factor, each optimiser is unscaled exactly once, and a skipped step backs the scale off.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.mixed_precision == "fp16")
    logger.info("learning rate %.3g (train.learning_rate %.3g × %d processes × batch %d × accumulation %d, "
                "lr_scaling=%s)", lr, cfg.train.learning_rate, accelerator.num_processes,
                cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.lr_scaling)

    wrapped_model, wrapped_discriminator = accelerator.prepare(model, discriminator)
    return TrainState(
        autoencoder=accelerator.unwrap_model(wrapped_model), discriminator=accelerator.unwrap_model(wrapped_discriminator),
        loss=loss, opt_ae=opt_ae, opt_d=opt_d, sched_ae=sched_ae, sched_d=sched_d, scaler=scaler, ema=ema,
        wrapped_autoencoder=wrapped_model, wrapped_discriminator=wrapped_discriminator,
        unit_codes=cfg.regularizer.vq.l2_normalize, frozen_codebook=cfg.model.trainable == "decoder")


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


def effective_learning_rate(cfg: Config, num_processes: int) -> float:
    """``train.learning_rate`` × processes × batch × accumulation under ``lr_scaling=linear``."""
    if cfg.train.lr_scaling == "none":
        return cfg.train.learning_rate
    return cfg.train.learning_rate * num_processes * cfg.train.batch_size * cfg.train.grad_accum_steps


def _check_step_size(lr: float, beta1: float) -> None:
    """Adam's largest step size, lr / (1 − β₁) at its first step, must be a float32 number: beyond,
    torch fails mid-step with an overflow traceback (foreach Adam) or computes inf (fused)."""
    if lr / (1 - beta1) > torch.finfo(torch.float32).max:
        raise ConfigError(f"the learning rate {lr:.3g} (train.learning_rate scaled by train.lr_scaling and "
                          f"train.disc_lr_ratio) gives Adam steps beyond float32's range; lower train.learning_rate")


def lr_lambda(cfg: Config):
    """Learning-rate factor of step n: linear warm-up, then constant, cosine or linear decay to 0."""
    warmup, total, schedule = cfg.train.lr_warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if schedule == "constant" or step < warmup:
            return scale
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return scale * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress)

    return factor
