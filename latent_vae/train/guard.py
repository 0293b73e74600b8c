"""One verdict per training step, agreed by all processes: skip it, and stop after it.

A step is *bad* when any process sees a non-finite loss or gradient norm; then neither
optimiser nor the EMA moves, on every process. A *stop* is requested when any process got
SIGTERM/SIGINT or passed ``train.time_limit_minutes``. Both flags travel in one all-reduce.

When the host learns the verdict: fused Adam skips a bad step by itself on the device
(``found_inf``), so with it the host reads the flags only at logging, checkpoint and final
steps, and the step runs without a host-device synchronisation; otherwise (other optimisers,
fp16's gradient scaler) the host reads them every step and skips the update itself. The skip
counters are therefore kept on the device and copied to the host only when it reads.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..config import Config
from ..distributed import all_reduce_sum_
from ..errors import TrainingError

logger = logging.getLogger("latent_vae")


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


@dataclass
class Verdict:
    """``bad``: 1.0 on the device when the step is skipped. ``skip``: the same on the host, or
    None when the host did not wait for it (fused Adam decides on the device)."""

    bad: torch.Tensor
    skip: Optional[bool]


class StepGuard:
    def __init__(self, cfg: Config, scaler: torch.amp.GradScaler, skipped_steps: int, device: torch.device,
                 stop: StopRequest):
        self.cfg, self.stop = cfg, stop
        self.decides_on_device = cfg.train.fused_optimizer and not scaler.is_enabled()
        self.skipped_on_device = torch.full((), float(skipped_steps), device=device)
        self.consecutive_on_device = torch.zeros((), device=device)
        # What the host last read (see host_reads); a resumed run starts from the checkpoint's count.
        self.skipped_steps, self.consecutive_bad, self.stop_requested = skipped_steps, 0, False
        self.reported_skipped = skipped_steps

    def host_reads(self, step: int) -> bool:
        """Whether the host waits for the verdict of ``step`` (0-based): every step unless fused Adam
        decides on the device, else before logging, checkpoint and final steps."""
        upcoming, cfg = step + 1, self.cfg
        return (not self.decides_on_device or upcoming % cfg.logging.log_every == 0
                or upcoming == cfg.train.max_steps or upcoming % cfg.train.checkpoint_every == 0)

    def check(self, values: List[torch.Tensor], step: int) -> Verdict:
        """The verdict of ``step`` from this process's losses and gradient norms (scalars)."""
        checked = torch.stack([v.float() for v in values])
        device = self.skipped_on_device.device
        flags = all_reduce_sum_(torch.stack([(~checked.isfinite().all()).float(),
                                             torch.full((), float(self.stop.local_flag()), device=device)]))
        bad = (flags[0] > 0).float()
        self.skipped_on_device += bad
        self.consecutive_on_device = (self.consecutive_on_device + 1) * bad
        skip = None
        if self.host_reads(step):
            status = torch.stack([bad, (flags[1] > 0).float(), self.skipped_on_device,
                                  self.consecutive_on_device]).tolist()
            self.stop_requested, self.skipped_steps, self.consecutive_bad = bool(status[1]), int(status[2]), int(status[3])
            if not self.decides_on_device:
                skip = bool(status[0])
        return Verdict(bad, skip)

    def log_skipped(self, step: int) -> None:
        """After ``step`` steps: warn about the bad steps the host learned of since its last warning."""
        if self.skipped_steps > self.reported_skipped:
            logger.warning("step %d: non-finite loss or gradient; %d step(s) skipped since the last report, for "
                           "both optimisers and the EMA (%d consecutive now, %d in total)", step - 1,
                           self.skipped_steps - self.reported_skipped, self.consecutive_bad, self.skipped_steps)
            self.reported_skipped = self.skipped_steps

    @property
    def exhausted(self) -> bool:
        """``train.max_bad_steps`` consecutive bad steps: the run stops."""
        return self.consecutive_bad >= self.cfg.train.max_bad_steps

    def error(self, step: int) -> TrainingError:
        return TrainingError(
            f"{self.consecutive_bad} consecutive non-finite steps (last at step {step - 1}); stopped. "
            f"The checkpoint at step {step} holds the weights from before the first bad step. "
            "Lower the learning rate, enable train.max_grad_norm, or use bf16 instead of fp16.")
