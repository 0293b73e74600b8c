"""Helpers shared by the benchmark scripts.

- ``Stats``: median and spread of repeated measurements;
- ``time_call``: time a function on a device (warm-up excluded, device synchronised);
- ``PeakMemory``: peak memory of a block of work (CUDA allocator, or sampled RSS on CPU);
- ``practical_peak_tflops`` / ``spec_sheet_bf16_tflops``: the device's measured and nominal peaks;
- ``machine_description``: what to quote with every figure;
- ``markdown_table``: the printed result tables;
- ``quiet_library_logs``: for scripts that call ``train()`` repeatedly.

Benchmarks import this module as ``common`` (``python benchmarks/bench_x.py`` puts
``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import platform
import statistics
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

# Nominal dense (no sparsity) bf16 tensor-core peaks from NVIDIA's spec sheets, TFLOP/s.
# Matched against torch.cuda.get_device_name(); the more specific names come first.
SPEC_SHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5
    ("H200", 989.0),  # also matches GH200
    ("A100", 312.0),
    ("L40S", 362.0),
)


# --------------------------------------------------------------------------- statistics


@dataclass
class Stats:
    """Repeated measurements of one quantity: the median and the min–max range."""

    samples: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def map(self, function: Callable[[float], float]) -> "Stats":
        """The same measurements in another unit (e.g. seconds per step -> images per second)."""
        return Stats([function(s) for s in self.samples])

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """``median (min–max)``, each multiplied by ``scale``."""
        if len(self.samples) == 1:
            return f"{self.median * scale:.{digits}f}"
        return f"{self.median * scale:.{digits}f} ({self.low * scale:.{digits}f}–{self.high * scale:.{digits}f})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> Stats:
    """Wall time of ``function()`` in seconds over ``repeats`` calls, after ``warmup`` untimed calls.

    The device is synchronised before and after each call, so asynchronous GPU work is counted.
    """
    for _ in range(warmup):
        function()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return Stats(samples)


# --------------------------------------------------------------------------- memory


def _resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_memory() -> None:
    """Free Python garbage and hand freed heap pages back to the OS (glibc), so an RSS rise
    measured next reflects new allocations rather than pages kept from earlier work."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS deltas are then a lower bound
        pass


class PeakMemory:
    """Peak memory used by the work inside the ``with`` block, above the level at entry, in bytes.

    CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) over the whole block.
    CPU: the process's resident set size sampled every ``interval`` seconds — approximate (it
    includes allocator slack and misses peaks shorter than the interval). Samples count only
    once ``start_when()`` is true and until ``stop_when()`` is: the window of interest, e.g. the
    training steps without the set-up's transient allocations or the final checkpoint's
    serialisation. The baseline is always the level at entry.
    """

    def __init__(self, device: torch.device, interval: float = 0.005,
                 start_when: Optional[Callable[[], bool]] = None,
                 stop_when: Optional[Callable[[], bool]] = None):
        self.device, self.interval = device, interval
        self.start_when, self.stop_when = start_when, stop_when
        self.peak: int = 0
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def kind(self) -> str:
        return "allocated" if self.device.type == "cuda" else "RSS"

    def __enter__(self) -> "PeakMemory":
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _resident_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        highest = self._base
        while not self._done.wait(self.interval):
            if self.stop_when is not None and self.stop_when():
                break
            if self.start_when is None or self.start_when():
                highest = max(highest, _resident_bytes())
        self.peak = highest - self._base

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._done.set()
            self._thread.join()


def format_bytes(count: Optional[float]) -> str:
    if count is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


# --------------------------------------------------------------------------- device peaks


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """The best TFLOP/s of a square ``size``² matmul in ``dtype``, measured now."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = time_call(lambda: torch.mm(a, b), device, warmup=3, repeats=repeats)
    return 2 * size**3 / stats.low / 1e12


@torch.no_grad()
def conv_peak_tflops(device: torch.device, dtype: torch.dtype, channels: int = 256, size: int = 64,
                     batch: int = 8, repeats: int = 5) -> float:
    """The best TFLOP/s of a 3×3 convolution (``channels`` in and out, ``size``² pixels), measured now."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
    images = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    stats = time_call(lambda: conv(images), device, warmup=2, repeats=repeats)
    return 2 * batch * channels**2 * 9 * size**2 / stats.low / 1e12


def practical_peak_tflops(device: torch.device, dtype: torch.dtype) -> Tuple[float, str]:
    """The device's practical peak in ``dtype``, measured now, and how it was measured.

    The best of the repetitions (not the median), so utilisation against it is conservative.
    CUDA: a bf16-class 8192² matmul (tensor cores; faster than any convolution). CPU: the better
    of a 2048² matmul and a large 3×3 convolution — the BLAS matmul is not always the fastest
    kernel (MKL's fp32 matmul on AMD CPUs trails oneDNN's convolutions by about 2×).
    """
    if device.type == "cuda":
        return matmul_peak_tflops(device, dtype, 8192), "8192² matmul"
    matmul = matmul_peak_tflops(device, dtype, 2048, repeats=5)
    conv = conv_peak_tflops(device, dtype)
    return max(matmul, conv), (f"best of a 2048² matmul, {matmul * 1e3:.0f} GFLOP/s, and a 3×3 256-channel "
                               f"conv, {conv * 1e3:.0f} GFLOP/s")


def spec_sheet_bf16_tflops(device: torch.device) -> Optional[float]:
    """The nominal dense bf16 peak of a known GPU, or None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in SPEC_SHEET_BF16_TFLOPS if key in name), None)


# --------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def machine_description(device: torch.device) -> List[str]:
    """Lines naming the hardware and software the figures were measured on."""
    import diffusers

    lines = [f"date: {datetime.date.today().isoformat()}",
             f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    lines.append(f"software: Python {platform.python_version()}, torch {torch.__version__}, "
                 f"diffusers {diffusers.__version__}")
    return lines


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table with padded columns (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator, *(line(r) for r in cells[1:])])


# --------------------------------------------------------------------------- running train() repeatedly




def quiet_library_logs() -> None:
    """Keep only warnings from ``train()``: its INFO lines would bury the tables. (A logger
    filter survives ``train()`` replacing the handlers.) Also silences torchvision's deprecation
    warnings, which the ``lpips`` package triggers every time LPIPS is built."""
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
    logging.getLogger("latent_vae").addFilter(lambda record: record.levelno >= logging.WARNING)
