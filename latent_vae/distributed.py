"""Processes: Accelerate set-up with one rule for CPU-only multi-process runs, and small collective
helpers that are no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def cpu_multiprocess() -> bool:
    """Several processes without CUDA (torchrun / accelerate launch on CPUs): Accelerate must use gloo on CPU."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(force_cpu: bool = False, **kwargs):
    """``accelerate.Accelerator`` for this launch (CPU-only multi-process runs on gloo)."""
    from accelerate import Accelerator

    return Accelerator(cpu=force_cpu or cpu_multiprocess(), **kwargs)


def process_state():
    """Accelerate's process state without an Accelerator (evaluation), under the same rule."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_multiprocess())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (identical result on every rank)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over processes; with equal per-process batches, the global-batch mean."""
    n = world_size()
    if n > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(n)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all ranks along dim 0, in rank order."""
    n = world_size()
    if n == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def release_process_group() -> None:
    """Leave the process group before the process exits. A rank that exits with it alive can be
    aborted by the backend's threads at interpreter shutdown (``terminate called without an
    active exception``), failing a run that had finished."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
