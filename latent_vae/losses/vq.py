"""Training-time vector quantisation over a stock ``VQModel``'s codebook.

The codebook *is* ``vae.quantize.embedding``: whatever changes it during training (gradient,
EMA updates, dead-code restarts), the exported model runs plain nearest-neighbour lookup
in that embedding, exactly what ``diffusers.VQModel`` does at inference.

Loss (van den Oord et al. 2017), with sg = stop-gradient and β = ``regularizer.vq.beta``:

    correct form:  ‖sg[z] − e‖² + β‖z − sg[e]‖²      (β on the commitment term)
    legacy form:   β‖sg[z] − e‖² + ‖z − sg[e]‖²      (taming ``legacy=True`` / diffusers' VectorQuantizer)
    EMA codebook:  β‖z − sg[e]‖²                      (the codebook is updated by moving averages)

scaled by ``regularizer.vq.weight`` and reduced like the reconstruction term (``reconstruction.reduction``).
Gradients reach the encoder through the straight-through estimator z_q = z + sg[e − z].

Codebook health, all decided identically on every process (statistics are all-reduced,
encoder outputs all-gathered in rank order, random choices seeded by step):
- EMA updates with Laplace smoothing of the cluster sizes (``regularizer.vq.ema_decay``);
- dead-code restart: a code unused for ``regularizer.vq.dead_after`` forward passes is re-initialised
  from a random recent encoder output (``regularizer.vq.restart_dead``);
- usage, perplexity and dead-code counts in the logs.

All of this state is changed inside the forward pass; the trainer keeps it only when the step is
accepted (``train/rollback.py`` restores it, counters included, after a bad step). So nothing here
depends on a host-side count of forward passes: the random draws are seeded by the step and the
forward pass's index within it, the ring buffer's position is computed on the device.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQConfig
from ..distributed import all_gather_cat, all_reduce_sum_
from .base import RegularizerOutput, reduce_elements

# Tokens per chunk of the distance computation: bounds the (tokens × codes) matrix.
_DISTANCE_ELEMENTS = 1 << 24


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ‖z_i − e_k‖² for rows of z (N, D), chunked so memory stays bounded."""
    chunk = max(1, _DISTANCE_ELEMENTS // codebook.shape[0])
    codebook_sq = codebook.pow(2).sum(1)
    indices = [
        (codebook_sq - 2.0 * part @ codebook.t()).argmin(dim=1)  # ‖z‖² is constant per row
        for part in z.split(chunk)
    ]
    return torch.cat(indices)


def codebook_statistics(counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Usage (fraction of codes hit) and perplexity exp(H) of a code histogram."""
    total = counts.sum().clamp(min=1)
    probs = counts.float() / total
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def normalize_codebook_(embedding: nn.Embedding) -> None:
    """Unit-norm codes: nearest-neighbour lookup of raw z then equals cosine lookup."""
    with torch.no_grad():
        embedding.weight.copy_(F.normalize(embedding.weight, dim=1))


class VectorQuantizerTrainer(nn.Module):
    def __init__(self, embedding: nn.Embedding, cfg: VQConfig, reduction: str, seed: int, frozen: bool = False):
        """``frozen``: the codebook is part of a latent space that must not move (decoder-only
        fine-tuning): no gradient, EMA update, restart or re-normalisation touches it."""
        super().__init__()
        # Not registered as a submodule: the weight belongs to (and is saved with) the VQModel.
        self.__dict__["embedding"] = embedding
        self.cfg, self.reduction, self.seed, self.frozen = cfg, reduction, seed, frozen
        num_codes, dim = embedding.weight.shape
        if cfg.ema_decay is not None:
            embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(num_codes))
            self.register_buffer("ema_embed_sum", embedding.weight.detach().clone())
        if cfg.l2_normalize and not frozen:
            normalize_codebook_(embedding)
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("num_forwards", torch.zeros((), dtype=torch.long))
        if cfg.restart_dead:
            self.register_buffer("recent", torch.zeros(cfg.restart_buffer, dim))
            self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long))
        self._step, self._micro = None, 0  # the training step, and this forward pass's index within it (accumulation)

    def forward(self, h: torch.Tensor, step: int) -> RegularizerOutput:
        batch, dim, height, width = h.shape
        z = h.permute(0, 2, 3, 1).reshape(-1, dim).float()
        if self.cfg.l2_normalize:
            z = F.normalize(z, dim=1)
            if self.training and self.cfg.ema_decay is None and not self.frozen:
                normalize_codebook_(self.embedding)  # undo the last optimiser step's drift off the sphere
        codebook = self.embedding.weight.float()
        with torch.no_grad():
            indices = nearest_codes(z.detach(), codebook)
        quantized = F.embedding(indices, codebook)

        shape = (batch, height, width, dim)
        commitment = (z - quantized.detach()).pow(2).reshape(shape)
        codebook_term = (z.detach() - quantized).pow(2).reshape(shape)
        beta = self.cfg.beta
        if self.cfg.ema_decay is not None:
            elementwise = beta * commitment
        elif self.cfg.legacy_beta:
            elementwise = beta * codebook_term + commitment
        else:
            elementwise = codebook_term + beta * commitment
        loss = self.cfg.weight * reduce_elements(elementwise, self.reduction)

        straight_through = z + (quantized - z).detach()
        latents = straight_through.reshape(shape).permute(0, 3, 1, 2).contiguous().to(h.dtype)
        logs = {"codebook_loss": reduce_elements(codebook_term.detach(), self.reduction),
                "commitment_loss": reduce_elements(commitment.detach(), self.reduction)}
        if self.training:
            logs.update(self._maintain_codebook(z.detach(), indices, step))
        return RegularizerOutput(latents=latents, loss=loss, logs=logs)

    @torch.no_grad()
    def _maintain_codebook(self, z: torch.Tensor, indices: torch.Tensor, step: int) -> Dict[str, torch.Tensor]:
        num_codes = self.embedding.weight.shape[0]
        counts = all_reduce_sum_(torch.bincount(indices, minlength=num_codes).float())
        stats = codebook_statistics(counts)
        batch_logs = {"codebook_usage_batch": stats["usage"], "codebook_perplexity_batch": stats["perplexity"]}
        if self.frozen:
            return batch_logs
        if self.cfg.ema_decay is not None:
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z)
            self._ema_update(counts, all_reduce_sum_(sums))
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        self.num_forwards += 1
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        restarted = torch.zeros((), device=z.device)
        if self.cfg.restart_dead:
            everyone = all_gather_cat(z)  # the global batch, in rank order
            self._remember(everyone, step)
            restarted = self._restart_dead(step)
        dead = (self.steps_unused >= self.cfg.dead_after).float().sum()
        return {**batch_logs, "codebook_usage": 1.0 - dead / num_codes, "dead_codes": dead, "restarted_codes": restarted}

    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        decay, eps = self.cfg.ema_decay, self.cfg.ema_epsilon
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + eps) / (total + self.ema_cluster_size.numel() * eps) * total
        new = self.ema_embed_sum / smoothed.unsqueeze(1)
        self.embedding.weight.copy_(F.normalize(new, dim=1) if self.cfg.l2_normalize else new)

    def _generator(self, step: int, stream: int) -> torch.Generator:
        from ..seeding import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.seed, 2, stream, step, self._micro))

    def _remember(self, z: torch.Tensor, step: int) -> None:
        """Keep a ring buffer of recent encoder outputs (a random subset of each global batch)."""
        capacity = self.recent.shape[0]
        take = min(len(z), max(1, capacity // 8))
        rows = _to_device(torch.randperm(len(z), generator=self._generator(step, 0))[:take], z.device)
        start = (self.num_forwards - 1) * take  # the accepted forwards before this one filled [0, start)
        slots = (torch.arange(take, device=z.device) + start) % capacity
        self.recent[slots] = z[rows]
        self.recent_filled.copy_(torch.clamp(self.recent_filled + take, max=capacity))

    def _restart_dead(self, step: int) -> torch.Tensor:
        """Re-initialise every dead code from a random recent encoder output. Written as masked
        updates over the whole codebook, so the host never waits for the device to learn which
        codes are dead; every rank draws the same numbers and holds the same buffer."""
        dead = (self.steps_unused >= self.cfg.dead_after) & (self.recent_filled > 0)
        draws = _to_device(torch.rand(len(dead), generator=self._generator(step, 1)), dead.device)
        picks = torch.minimum((draws * self.recent_filled).long(), torch.clamp(self.recent_filled - 1, min=0))
        new_codes = self.recent[picks]
        weight = self.embedding.weight
        weight.copy_(torch.where(dead[:, None], new_codes.to(weight.dtype), weight))
        if self.cfg.ema_decay is not None:
            self.ema_embed_sum.copy_(torch.where(dead[:, None], new_codes, self.ema_embed_sum))
            self.ema_cluster_size.masked_fill_(dead, 1.0)
        self.steps_unused.masked_fill_(dead, 0)
        return dead.sum().float()


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-made random numbers to the device without waiting for it (pinned, asynchronous copy)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
