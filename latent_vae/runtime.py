"""How code runs: precision and autocast with fp32 fallback, torch.compile with eager fallback, atomic file
writes, content digests of files, and the one lock of an output folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, List, Optional, Tuple

import torch
from torch import nn

logger = logging.getLogger("latent_vae")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device, vq: bool = False) -> str:
    """``auto``: bf16 autocast on a CUDA device that supports it (bf16 has fp32's exponent range,
    so it cannot overflow like fp16), fp32 elsewhere and for VQ models (a token id is the nearest
    code: rounding can flip it, and ids must equal stock fp32 ones)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() and not vq else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def run_with_fp32_fallback(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, precision: str,
                           retry: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Tuple[torch.Tensor, bool]:
    """``fn(x)`` under ``precision`` autocast, as fp32. A non-finite result (fp16 overflow: black or
    NaN images in some VAEs) is recomputed in fp32 with ``retry`` (default ``fn``); the flag says so."""
    with autocast(x.device, precision):
        out = fn(x).float()
    if precision == "fp32" or torch.isfinite(out).all():
        return out, False
    return (retry or fn)(x).float(), True


class _CompiledOrEager:
    """``torch.compile(fn)``, falling back to ``fn`` (once, with a warning) where compilation
    is unavailable or fails: no C++ compiler, an unsupported platform or Python version."""

    def __init__(self, fn: Callable, backend: str = "inductor"):
        self.eager, self.failure = fn, None
        try:
            self.compiled = torch.compile(fn, backend=backend)
        except Exception as err:  # torch.compile raises at construction on unsupported platforms
            self._fall_back(err)

    def _fall_back(self, err: Exception) -> None:
        self.failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        logger.warning("torch.compile unavailable (%s); continuing without compilation", self.failure)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failure is None:
            try:
                return self.compiled(x)
            except Exception as err:  # compilation happens lazily, at the first call of each shape
                self._fall_back(err)
        return self.eager(x)


# Set by the user (or torchrun / accelerate launch) to choose intra-op threads themselves.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what taskset, cgroups or Slurm grant)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """DataLoader workers by default: one CPU is left to the process that runs the model, at most 4."""
    return min(4, max(0, available_cpus() - 1))


def configure_cpu_threads(device: torch.device, num_workers: int) -> int:
    """The one rule for intra-op threads of a CPU job (train, encode, eval); returns the count in use.

    torch's default is one OpenMP thread per core, ignoring the DataLoader workers and the other
    processes of a launch. On a busy 2-core machine those threads spin against each other at every
    parallel region: encoding ran at 2 img/s with the default and 14 img/s with one thread. So a
    CPU job gets the CPUs this process may use, divided among the processes of this machine
    (``LOCAL_WORLD_SIZE``), minus its DataLoader workers, and at least one. Only ever lowered; an
    explicit ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (torchrun sets 1) is respected, and GPU jobs are
    left alone.
    """
    if device.type != "cpu" or any(name in os.environ for name in THREAD_ENV_VARS):
        return torch.get_num_threads()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    budget = max(1, available_cpus() // processes - num_workers)
    if torch.get_num_threads() > budget:
        torch.set_num_threads(budget)
        logger.info("CPU threads: %d (%d CPUs, %d processes, %d DataLoader workers; set OMP_NUM_THREADS to choose)",
                    budget, available_cpus(), processes, num_workers)
    return torch.get_num_threads()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What an ordinary file or folder gets under the user's umask. Writers such as safetensors'
# ``save_file`` create 0600 files, which another user, a WebUI service or a team share cannot read.
_UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def ordinary_permissions(path: Path) -> None:
    """Give ``path`` (recursively, for a folder) the permissions of a file the user creates."""
    path = Path(path)
    os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)
    if path.is_dir():
        for child in path.rglob("*"):
            os.chmod(child, DIR_MODE if child.is_dir() else FILE_MODE)


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's entry to disk (a folder: so a rename inside it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write_to: Callable[[Path], Any]) -> Path:
    """The one atomic file write: ``write_to(tmp)`` writes a temporary sibling, which is fsynced and
    renamed over ``path``. A kill leaves the previous file or the complete new one, never a torn
    one under the final name; a failed write removes its temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_to(tmp)
        os.chmod(tmp, FILE_MODE)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> Path:
    """``atomic_write`` through ``write(handle)`` on a binary file handle."""
    def write_to(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return atomic_write(path, write_to)


def atomic_write_json(path: Path, payload: Any) -> Path:
    return atomic_write_bytes(path, lambda h: h.write(json.dumps(payload, indent=1, sort_keys=True).encode()))


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, read in 1 MiB blocks: what a manifest records, so that a file
    corrupted in place at the same size is caught when it is read back."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def try_lock(path: Path, shared: bool = False) -> Optional[IO]:
    """An ``flock`` on ``path`` (created if needed), or None when another process holds a
    conflicting one. The open handle holds the lock until it is closed or its process ends: the
    kernel drops it even after SIGKILL, so no stale lock file ever has to be cleaned up. Several
    ``shared`` holders coexist; an exclusive one excludes all others."""
    import fcntl

    handle = open(path, "a")
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def replace_dir(staging: Path, final: Path) -> Path:
    """Swap a complete ``staging`` folder into place as ``final``: an existing ``final`` is moved aside
    first and removed after, so a crash leaves the old or the new folder, never a mix. Its files get
    ordinary permissions (``ordinary_permissions``)."""
    ordinary_permissions(staging)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{time.time_ns()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_path(final.parent)
    return final


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so that another ``train()`` in this process may use
    other settings (e.g. another mixed precision): notebooks, benchmarks and tests."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def compile_modules(modules: List[nn.Module], backend: str) -> None:
    """``torch.compile`` in place (state-dict keys unchanged); a module that cannot be compiled
    falls back to eager execution with a warning instead of failing the run."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        logger.warning("train.compile: torch.compile is not supported here (Python %s); running eagerly",
                       sys.version.split()[0])
        return
    torch._dynamo.config.suppress_errors = True
    for module in modules:
        module.compile(backend=backend)
    logger.info("compiled %d modules with torch.compile(backend=%s)", len(modules), backend)
