"""What a run reports while it trains: the log file, tracker scalars, progress, warnings."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.sources import Failure
from ..distributed import all_reduce_sum_, world_size
from ..errors import ConfigError
from ..losses.kl import ACTIVE_UNIT_THRESHOLD

logger = logging.getLogger("latent_vae")


# Each tracker's Python package and pip name (Accelerate drops a tracker whose package is missing, with a warning).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(trackers: List[str]) -> None:
    """Every tracker in ``logging.trackers`` can be imported: a missing one is an error naming the install."""
    import importlib

    for tracker in trackers:
        try:
            importlib.import_module(TRACKER_PACKAGES[tracker])
        except ImportError:
            raise ConfigError(f"logging.trackers includes {tracker}, which is not installed: pip install "
                              f"{TRACKER_PACKAGES[tracker]} (or leave it out of logging.trackers)") from None


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """The ``latent_vae`` logger: stderr on every process (warnings only on the others), and
    ``train.log`` in the run directory on the main process."""
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = _ProgressSafeHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(console)
    if is_main:
        file = logging.FileHandler(output_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)


class _ProgressSafeHandler(logging.StreamHandler):
    """Console log lines that do not break the progress bar: written through ``tqdm.write``, which
    clears the bar, prints the line and redraws the bar below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # the logging module's contract: report, never raise
            self.handleError(record)


def progress_bar_shown(is_main: bool) -> bool:
    """A live progress bar only on the main process and only on a terminal: redirected to a file or a
    job log, its carriage-return updates would interleave with the log lines (plain progress lines
    at every logging step take its place)."""
    return is_main and sys.stderr.isatty()


class FailureLog:
    """Inputs that could not be decoded: counted once each and listed in ``skipped_inputs.txt``.

    Every process warns about the failures it meets; the main process lists its own at once and the
    other processes' at ``gather()`` (each rank of a sharded stream reads other shards)."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main, self.seen = path, is_main, set()
        self.unshared: List[Failure] = []

    def add(self, failures: List[Failure]) -> None:
        for failure in failures:
            if failure.key in self.seen:
                continue
            self.seen.add(failure.key)
            logger.warning("skipped unreadable input %s: %s", failure.key, failure.reason)
            if self.is_main:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(f"{failure.key}\t{failure.reason}\n")
            else:
                self.unshared.append(failure)

    def gather(self) -> None:
        """Collective: the main process lists (and counts) the failures the other processes met."""
        from accelerate.utils import gather_object

        shared = gather_object([(f.key, f.reason) for f in self.unshared]) if world_size() > 1 else []
        self.unshared = []
        if self.is_main:
            self.add([Failure(key, reason) for key, reason in shared])


class MetricWindow:
    """Sums of logged values between two logging steps, kept on the device (no host sync). A step's
    values wait in ``pending`` until its verdict: those of a bad (rolled back) step are left out,
    so one NaN batch does not turn the whole window's means into NaN."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, Any] = {}
        self.pending: List[Dict[str, Any]] = []

    def add(self, values: Dict[str, Any]) -> None:
        """Copied now: some values are views of parameters the step's update changes (``logvar``)."""
        self.pending.append({key: value.detach().to(torch.float32, copy=True) if isinstance(value, torch.Tensor)
                             else value for key, value in values.items()})

    def settle(self, bad: torch.Tensor) -> None:
        """Count the pending values of the step whose verdict is ``bad`` (1.0: leave them out).
        Tensors are summed where they live, masked by the verdict on the device; Python numbers (host
        values such as schedules, never NaN from data) on the host: a host-to-device copy of a number
        every step would synchronise the device."""
        for values in self.pending:
            for key, value in values.items():
                count: Any = 1
                if isinstance(value, torch.Tensor):
                    value = torch.where(bad > 0, torch.zeros((), device=value.device), value)
                    count = 1 - bad
                self.sums[key] = self.sums[key] + value if key in self.sums else value
                self.counts[key] = self.counts[key] + count if key in self.counts else count
        self.pending = []

    def reduce(self) -> Dict[str, Any]:
        """Means over the window's accepted steps and over processes, on the host (NaN for a value no
        accepted step logged)."""
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


class TrainingLog:
    """The training scalars (``train/<name>`` on the trackers): means of the logged values over
    the steps since the last logging step, plus throughput; the progress bar; collapse warnings."""

    def __init__(self, accelerator, cfg: Config, step: int, images_per_step: int, desc: str = "train"):
        self.accelerator, self.images_per_step, self.log_every = accelerator, images_per_step, cfg.logging.log_every
        self.metrics = MetricWindow(accelerator.device)
        self.collapse = CollapseMonitor()
        self.max_steps, self.first_step = cfg.train.max_steps, step
        self.progress = tqdm(total=cfg.train.max_steps, initial=step, desc=desc, dynamic_ncols=True,
                             disable=not progress_bar_shown(accelerator.is_main_process))
        self.step_seconds: List[float] = []  # wall time per step (the step's verdict synchronises the device)
        self.step_start = time.perf_counter()

    def step_done(self) -> None:
        self.progress.update(1)
        self.step_seconds.append(time.perf_counter() - self.step_start)
        self.step_start = time.perf_counter()

    def write(self, step: int, ae_grad_norm: torch.Tensor, d_grad_norm: Optional[torch.Tensor], lr: float,
              skipped_steps: int) -> None:
        values = self.metrics.reduce()
        recent = self.step_seconds[-self.log_every:]
        values.update(ae_grad_norm=ae_grad_norm, lr=lr, skipped_steps=skipped_steps,
                      seconds_per_step=sum(recent) / len(recent),
                      images_per_second=len(recent) * self.images_per_step / sum(recent))
        if d_grad_norm is not None:
            values["d_grad_norm"] = d_grad_norm
        scalars = _scalars(values)
        self.accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        self.collapse.check(scalars, step)
        shown = {k: f"{scalars[k]:.4g}" for k in ("nll", "pixel", "lpips", "g_loss", "d_loss") if k in scalars}
        if self.progress.disable:  # no live bar (not a terminal): one plain line with the same information
            done = step - self.first_step
            eta = (self.max_steps - step) * sum(self.step_seconds) / max(done, 1)
            logger.info("step %d/%d (%.0f%%), %.2f s/step, ETA %s: %s", step, self.max_steps,
                        100 * step / self.max_steps, values["seconds_per_step"], _duration(eta),
                        ", ".join(f"{k} {v}" for k, v in shown.items()))
        else:
            self.progress.set_postfix(shown)

    def close(self) -> None:
        self.progress.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def flat_hparams(tree: Dict, prefix: str = "") -> Dict[str, Any]:
    """The config for the trackers' hyper-parameters: TensorBoard accepts only scalars and strings."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
