"""Rank 0's MLflow logging during training: step stats, epoch metrics, prediction galleries.

Idempotent by step: a worker group restarted from a checkpoint replays steps and epochs that
may already be in MLflow; those are skipped, so the run's history has each step exactly once.

The store is written from a background thread, in call order: every rank waits for the slowest
at each gradient exchange, so a SQLite write or a gallery's PNG encoding on rank 0's step path
held up the whole group (about 0.25 s an epoch on the demo recipe).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from rsrefseg.platform import paths, tracking
from rsrefseg.platform.config import Config


class EpochLogger:
    def __init__(self, cfg: Config, run_id: str | None, *, enabled: bool):
        self.enabled = bool(enabled and run_id and cfg.tracking.enabled)
        self.run_id = run_id
        self.cfg = cfg
        if not self.enabled:
            return
        self.client = tracking.client(cfg.tracking)
        self._seen_steps = tracking.logged_steps(self.client, run_id, "train/loss")
        self._seen_epochs = tracking.logged_steps(self.client, run_id, "val/gIoU")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsrefseg-mlflow")
        self._pending: list[Future] = []

    def log_run_info(self, *, trainable: int, total: int, nodes: list[str], precision: str, zero_stage: int) -> None:
        if not self.enabled:
            return
        self._write(tracking.log_params, self.client, self.run_id, {
            "model.trainable_params": trainable,
            "model.total_params": total,
            "train.resolved_precision": precision,
            "train.deepspeed_zero_stage": zero_stage,
        })
        self._write(self.client.set_tag, self.run_id, "rsrefseg.worker_nodes", ",".join(nodes))

    def log_step(self, stats: dict, step: int) -> None:
        if not self.enabled or step in self._seen_steps:
            return
        self._write(tracking.log_metrics, self.client, self.run_id, stats, step, timestamp_ms=tracking.now_ms())
        self._seen_steps.add(step)

    def log_epoch(self, metrics: dict, epoch: int, examples: list[dict]) -> None:
        """`examples` (Gallery.examples) are handed over: the caller must not change them."""
        if not self.enabled or epoch in self._seen_epochs:
            return
        self._write(tracking.log_metrics, self.client, self.run_id,
                    {k: v for k, v in metrics.items() if k != "epoch"}, epoch, timestamp_ms=tracking.now_ms())
        self._seen_epochs.add(epoch)
        if examples:
            self._write(self._log_gallery, examples, epoch)

    def close(self, *, check: bool = True) -> None:
        """Wait for everything queued; a failed write raises here if no later call raised it
        (with check=False it is dropped: the caller is already failing for another reason)."""
        if not self.enabled:
            return
        self._writer.shutdown(wait=True)
        if check:
            self._raise_failed()

    def _log_gallery(self, examples: list[dict], epoch: int) -> None:
        from rsrefseg.inference.gallery import prediction_image

        image = prediction_image(examples, title=f"validation, epoch {epoch}")
        self.client.log_image(self.run_id, image, artifact_file=f"val_predictions/epoch_{epoch:03d}.png")

    def _write(self, fn: Callable, *args, **kwargs) -> None:
        # A store that fails stops the run as before, at the next call instead of this one.
        self._raise_failed()
        self._pending.append(self._writer.submit(fn, *args, **kwargs))

    def _raise_failed(self) -> None:
        # One done() per future: asked twice, a write finishing in between fell out of both lists
        # and its error was never raised.
        done, pending = [], []
        for future in self._pending:
            (done if future.done() else pending).append(future)
        self._pending = pending
        for future in done:
            future.result()


class SystemMetrics:
    """MLflow's own system-metrics monitor (a sampling thread) for one node of a train run: the
    node's first worker logs `system/<host>/...` (CPU, memory, disk, network, and GPU utilization
    and memory through NVML where there is a GPU), so an input-bound run can be told from a
    compute-bound one."""

    def __init__(self, cfg: Config, run_id: str | None, *, enabled: bool, resume: bool = False):
        self.monitor = None
        if not (enabled and run_id and cfg.tracking.enabled and cfg.tracking.system_metrics_s > 0):
            return
        import socket

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            run_id, sampling_interval=cfg.tracking.system_metrics_s, node_id=socket.gethostname(),
            resume_logging=resume, tracking_uri=paths.tracking_uri(cfg.tracking),
        )
        self.monitor.start()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
