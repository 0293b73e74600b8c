"""One verdict per training step, agreed by all processes: skip it, and stop after it.

A step is *bad* when any process sees a non-finite loss or gradient norm, or non-finite state
after the update (weights, optimiser state, forward-pass state); then everything the step changed
is rolled back on every process (``rollback.py``) and the EMA does not move. A *stop* is requested
when any process got SIGTERM/SIGINT or passed ``train.time_limit_minutes``. Both flags travel in
one all-reduce.

The verdict is applied on the device, so the host need not wait for it. With fused Adam (and
bf16/fp32) the host reads the flags only at logging, checkpoint and final steps, and the step runs
without a host-device synchronisation; otherwise (foreach Adam keeps its step counts on the host,
fp16's gradient scaler reads its own flag) the host reads them every step. The skip counters are
therefore kept on the device and copied to the host only when it reads.
"""

from __future__ import annotations

import logging
import signal
import time
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


class StepGuard:
    def __init__(self, cfg: Config, scaler: torch.amp.GradScaler, skipped_steps: int, device: torch.device,
                 stop: StopRequest):
        self.cfg, self.stop = cfg, stop
        self.sync_free = cfg.train.fused_optimizer and not scaler.is_enabled()
        self.skipped_on_device = torch.full((), float(skipped_steps), device=device)
        self.consecutive_on_device = torch.zeros((), device=device)
        # What the host last read (see host_reads); a resumed run starts from the checkpoint's count.
        self.skipped_steps, self.consecutive_bad, self.stop_requested = skipped_steps, 0, False
        self.reported_skipped = skipped_steps

    def host_reads(self, step: int) -> bool:
        """Whether the host waits for the verdict of ``step`` (0-based): every step unless the step is
        otherwise free of host synchronisation (fused Adam), else before logging, checkpoint and final steps."""
        upcoming, cfg = step + 1, self.cfg
        return (not self.sync_free or upcoming % cfg.logging.log_every == 0
                or upcoming == cfg.train.max_steps or upcoming % cfg.train.checkpoint_every == 0)

    def check(self, values: List[torch.Tensor], state_finite: torch.Tensor, step: int) -> torch.Tensor:
        """The verdict of ``step`` from this process's losses and gradient norms (scalars) and whether
        its state after the update is finite (1.0/0.0): 1.0 on the device when the step is bad."""
        checked = torch.stack([v.float() for v in values])
        device = self.skipped_on_device.device
        local_bad = torch.maximum((~checked.isfinite().all()).float(), 1 - state_finite.float())
        flags = all_reduce_sum_(torch.stack([local_bad, torch.full((), float(self.stop.local_flag()), device=device)]))
        bad = (flags[0] > 0).float()
        self.skipped_on_device += bad
        self.consecutive_on_device = (self.consecutive_on_device + 1) * bad
        if self.host_reads(step):
            stop, skipped, consecutive = torch.stack([(flags[1] > 0).float(), self.skipped_on_device,
                                                      self.consecutive_on_device]).tolist()
            self.stop_requested, self.skipped_steps, self.consecutive_bad = bool(stop), int(skipped), int(consecutive)
        return bad

    def log_skipped(self, step: int) -> None:
        """After ``step`` steps: warn about the bad steps the host learned of since its last warning."""
        if self.skipped_steps > self.reported_skipped:
            logger.warning("step %d: non-finite loss, gradient or update; %d step(s) skipped since the last report "
                           "and rolled back: weights, optimiser and regulariser state, EMA (%d consecutive now, "
                           "%d in total)", step - 1,
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
