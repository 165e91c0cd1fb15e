"""Progress a person can follow in the job log: epoch/step, loss, throughput, ETA."""

from __future__ import annotations

import time

# Not `print`, which Ray Train patches in its workers: console.say writes the worker's stdout,
# which Ray forwards to the driver and the job log.
from rsrefseg.platform.console import duration, say


class Progress:
    """Prints one line per logging interval and one per epoch (rank 0 only)."""

    def __init__(self, *, total_epochs: int, steps_per_epoch: int, enabled: bool = True):
        self.total_epochs = total_epochs
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._first_step: int | None = None
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def step(self, global_step: int, stats: dict) -> None:
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step, self._t0 = global_step, time.perf_counter()
        total = self.total_epochs * self.steps_per_epoch
        done = global_step - self._first_step
        rate = done / max(time.perf_counter() - self._t0, 1e-9) if done else 0.0
        eta = duration((total - global_step) / rate) if rate else "?"
        in_epoch = global_step - (self.epoch - 1) * self.steps_per_epoch
        say(
            f"[rsrefseg] epoch {self.epoch}/{self.total_epochs} step {in_epoch}/{self.steps_per_epoch} "
            f"loss {stats['train/loss']:.4f} lr {stats['train/lr']:.2e} "
            f"{stats['train/samples_per_s']:.1f} samples/s ETA {eta}"
        )

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        if not self.enabled:
            return
        shown = " ".join(
            f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items() if k.startswith("val/") and k != "val/count"
        )
        say(f"epoch {epoch}/{self.total_epochs} validation: {shown}")
