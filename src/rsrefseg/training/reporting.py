"""Rank 0's MLflow logging during training: step stats, epoch metrics, prediction figures.

Idempotent by step: a worker group restarted from a checkpoint replays steps and epochs that
may already be in MLflow; those are skipped, so the run's history has each step exactly once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rsrefseg.platform import tracking
from rsrefseg.platform.config import Config

if TYPE_CHECKING:
    import torch


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

    def log_run_info(self, *, trainable: int, total: int, nodes: list[str], precision: str, zero_stage: int) -> None:
        if not self.enabled:
            return
        tracking.log_params(self.client, self.run_id, {
            "model.trainable_params": trainable,
            "model.total_params": total,
            "train.resolved_precision": precision,
            "train.deepspeed_zero_stage": zero_stage,
        })
        self.client.set_tag(self.run_id, "rsrefseg.worker_nodes", ",".join(nodes))

    def log_step(self, stats: dict, step: int) -> None:
        if not self.enabled or step in self._seen_steps:
            return
        tracking.log_metrics(self.client, self.run_id, stats, step)
        self._seen_steps.add(step)

    def log_epoch(self, metrics: dict, epoch: int, examples: list[dict]) -> None:
        if not self.enabled or epoch in self._seen_epochs:
            return
        tracking.log_metrics(self.client, self.run_id, {k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        self._seen_epochs.add(epoch)
        if examples:
            fig = prediction_figure(examples, title=f"validation, epoch {epoch}")
            self.client.log_figure(self.run_id, fig, f"val_predictions/epoch_{epoch:03d}.png")
            close_figure(fig)

    def close(self) -> None:
        pass


class Gallery:
    """The k lowest- and k highest-IoU samples seen so far, with their pixels (label size)."""

    def __init__(self, k: int):
        self.k = k
        self.kept: list[dict] = []

    def offer(self, batch: dict, pred: torch.Tensor, ious: list[float]) -> None:
        if not self.k:
            return
        for i, iou in enumerate(ious):
            self.kept.append({"iou": iou, "id": batch["id"][i], "phrase": batch["phrase"][i], "i": i, "batch": batch, "pred": pred})
        self.kept.sort(key=lambda e: (e["iou"], e["id"]))
        if len(self.kept) > 2 * self.k:
            self.kept = self.kept[: self.k] + self.kept[-self.k :]
        for e in self.kept:  # keep one sample's pixels, not whole batches
            if "batch" in e:
                batch, i = e.pop("batch"), e.pop("i")
                e.update(image=batch["sam_image"][i].cpu(), mask=batch["mask"][i].cpu(), pred=e["pred"][i].cpu())

    def examples(self) -> list[dict]:
        """Lowest IoU first; with more than k samples, the first k are the worst, the rest the best."""
        ranked = len(self.kept) > self.k

        def note(j: int, e: dict) -> str:
            return f"IoU {e['iou']:.2f}" + ((" (worst)" if j < self.k else " (best)") if ranked else "")

        return [{**e, "note": note(j, e)} for j, e in enumerate(self.kept)]


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
            resume_logging=resume, tracking_uri=tracking.resolve_tracking_uri(cfg.tracking),
        )
        self.monitor.start()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


def prediction_figure(examples: list[dict], *, title: str = ""):
    """Rows of (image, ground truth, prediction) with the phrase (and an optional "note", e.g.
    the sample's IoU) above each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(examples)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for row, ex in zip(axes, examples):
        image = ex["image"].permute(1, 2, 0).numpy()
        row[0].imshow(image)
        note = f'  {ex["note"]}' if ex.get("note") else ""
        row[0].set_title(f'"{ex["phrase"]}"{note}', fontsize=8, loc="left")
        row[1].imshow(ex["mask"].numpy(), cmap="gray", vmin=0, vmax=1)
        row[1].set_title("ground truth", fontsize=8)
        row[2].imshow(ex["pred"].numpy(), cmap="gray", vmin=0, vmax=1)
        row[2].set_title("prediction", fontsize=8)
        for ax in row:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def close_figure(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)
