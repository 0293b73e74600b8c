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
from ..losses.kl import ACTIVE_UNIT_THRESHOLD

logger = logging.getLogger("latent_vae")


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """The ``latent_vae`` logger: stderr on every process (warnings only on the others), and
    ``train.log`` in the run directory on the main process."""
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


class TrainingLog:
    """The training scalars (``train/<name>`` on the trackers): means of the logged values over
    the steps since the last logging step, plus throughput; the progress bar; collapse warnings."""

    def __init__(self, accelerator, cfg: Config, step: int, images_per_step: int, desc: str = "train"):
        self.accelerator, self.images_per_step, self.log_every = accelerator, images_per_step, cfg.logging.log_every
        self.metrics = MetricWindow(accelerator.device)
        self.collapse = CollapseMonitor()
        self.progress = tqdm(total=cfg.train.max_steps, initial=step, disable=not accelerator.is_main_process,
                             desc=desc, dynamic_ncols=True)
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
        self.progress.set_postfix({k: f"{scalars[k]:.4g}" for k in ("nll", "pixel", "lpips", "g_loss", "d_loss")
                                   if k in scalars})

    def close(self) -> None:
        self.progress.close()


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
