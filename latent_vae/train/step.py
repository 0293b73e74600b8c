"""One training step: the generator (autoencoder) update and the discriminator update.

For every micro-batch: the G step (the autoencoder's loss back-propagated with D frozen), then
the D step on the *same* reconstructions, detached. After the last micro-batch: unscale, gradient
norms, clipping, both optimiser steps, the processes' shared verdict (``guard.py``) on the losses,
gradient norms and updated state, the rollback of a bad step (``rollback.py``: everything the
step changed, forward-pass state included, returns to what was saved before it), the EMA update,
zero_grad. Gradients of the micro-batches accumulate; DDP all-reduces them once, with the last.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..config import Config
from .guard import StepGuard
from .monitor import MetricWindow
from .state import TrainState


@dataclass
class StepOutput:
    gan_active: bool
    ae_grad_norm: torch.Tensor
    d_grad_norm: Optional[torch.Tensor]  # None before gan.start


def train_step(state: TrainState, batches: List[Dict[str, Any]], step: int, guard: StepGuard,
               metrics: MetricWindow, accelerator, cfg: Config) -> StepOutput:
    """Step ``step`` (0-based) over ``batches``, accumulated. The logged values of every micro-batch
    go to ``metrics`` (detached before the update: some are views of parameters it changes), which
    counts them only if the step is accepted."""
    gan_active = state.loss.gan_active(step)
    state.snapshot.save(state.step_tensors())  # before the forward passes: they update state too
    losses: List[torch.Tensor] = []
    for micro, batch in enumerate(batches):
        images = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        seeds = batch["seeds"].tolist()
        last = micro == len(batches) - 1
        with _no_sync(accelerator, [state.wrapped_autoencoder, state.wrapped_discriminator], sync=last):
            losses += _backward(state, images, seeds, step, gan_active, len(batches), metrics, accelerator,
                                concat_real_fake=cfg.gan.norm != "sync_batch")

    state.scaler.unscale_(state.opt_ae)
    if gan_active:
        state.scaler.unscale_(state.opt_d)
    ae_params, d_params = _params(state.opt_ae), _params(state.opt_d)
    ae_norm = _grad_norm(ae_params)
    d_norm = _grad_norm(d_params) if gan_active else torch.zeros((), device=accelerator.device)
    if cfg.train.max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(ae_params, cfg.train.max_grad_norm, ae_norm)
        if gan_active:
            torch.nn.utils.clip_grads_with_norm_(d_params, cfg.train.max_grad_norm, d_norm)
    state.scaler.step(state.opt_ae)  # fp16: skipped here on non-finite gradients; the rollback covers the rest
    state.sched_ae.step()  # the schedules follow the step counter, skipped steps included
    if gan_active:  # the discriminator's schedule counts its own steps from gan.start
        state.scaler.step(state.opt_d)
        state.sched_d.step()
    # One decision for the whole step, shared by all processes: the losses and gradient norms, and the
    # state after the update (finite losses and gradients can still give a non-finite update).
    changed = state.step_tensors()
    bad = guard.check([*losses, ae_norm, d_norm], state.snapshot.all_finite(changed, accelerator.device), step)
    state.snapshot.restore(changed, bad)
    metrics.settle(bad)
    if state.ema is not None:
        state.ema.update(state.autoencoder.vae, skip=bad)
    state.scaler.update()
    state.opt_ae.zero_grad(set_to_none=True)
    state.opt_d.zero_grad(set_to_none=True)
    return StepOutput(gan_active, ae_norm, d_norm if gan_active else None)


def _backward(state: TrainState, images: torch.Tensor, seeds: List[int], step: int, gan_active: bool,
              accumulation: int, metrics: MetricWindow, accelerator, concat_real_fake: bool) -> List[torch.Tensor]:
    """The G step then the D step of one micro-batch, up to their backward passes; returns their losses."""
    discriminator, scaler = state.discriminator, state.scaler
    # Generator step. D is frozen, so L_G's gradient reaches the autoencoder only.
    discriminator.requires_grad_(False)
    with accelerator.autocast():
        out = state.wrapped_autoencoder(images, seeds, step)
        # fp16's loss scale as a device tensor (no host read), for the adaptive weight's own backward passes
        grad_scale = scaler.scale(torch.ones((), device=images.device)) if scaler.is_enabled() else None
        g_loss, logs = state.loss.generator_loss(images, out.reconstructions, out.regularizer.loss, out.logvar, step,
                                                 discriminator if gan_active else None, state.autoencoder.last_layer,
                                                 grad_scale)
        g_loss = g_loss + _diffusability_terms(state, images, out, step, logs)
    scaler.scale(g_loss / accumulation).backward()
    losses = [g_loss.detach()]
    # Discriminator step on the same reconstructions, detached: no gradient to the autoencoder.
    if gan_active:
        discriminator.requires_grad_(True)
        with accelerator.autocast():
            d_loss, d_logs = state.loss.discriminator_loss(state.wrapped_discriminator, images, out.reconstructions,
                                                           concat_real_fake)
        scaler.scale(d_loss / accumulation).backward()
        losses.append(d_loss.detach())
        logs.update(d_logs)
    metrics.add(logs)
    metrics.add(out.regularizer.logs)
    return losses


def _diffusability_terms(state: TrainState, images: torch.Tensor, out, step: int, logs: Dict) -> torch.Tensor:
    """The diffusability regularisers (``losses/diffusability.py``) added to L_G when enabled, else 0."""
    # A distilled student (``distill``) has no regulariser, and a plain run no diffusability terms.
    terms = getattr(getattr(state.autoencoder, "regularizer", None), "diffusability", None)
    if terms is None:
        return torch.zeros((), device=images.device)
    loss, values = terms(state.autoencoder.vae, images, out.regularizer.latents, out.reconstructions, out.logvar,
                         state.loss.reconstruction_terms, step)
    logs.update(values, total=logs["total"] + loss.detach())
    return loss


def _no_sync(accelerator, models: List[nn.Module], sync: bool):
    """Skip the DDP gradient all-reduce on all but the last micro-batch of an accumulation."""
    stack = contextlib.ExitStack()
    if not sync:
        for m in models:
            stack.enter_context(accelerator.no_sync(m))
    return stack


def _params(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _grad_norm(params: List[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device)
    return torch.nn.utils.get_total_norm(grads, foreach=True).float()
