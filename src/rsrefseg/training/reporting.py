"""Rank 0's MLflow logging during training: step stats, epoch metrics, prediction galleries.

Idempotent by step: a worker group restarted from a checkpoint replays steps and epochs that
may already be in MLflow; those are skipped, so the run's history has each step exactly once.

The store is written from a background thread, in call order: every rank waits for the slowest
at each gradient exchange, so a SQLite write or a gallery's PNG encoding on rank 0's step path
held up the whole group (about 0.25 s an epoch on the demo recipe).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from rsrefseg.platform import paths, tracking
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
            resume_logging=resume, tracking_uri=paths.tracking_uri(cfg.tracking),
        )
        self.monitor.start()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


# Each panel of the prediction gallery is drawn at this size, whatever the model's input size
# (64 px at `tiny`, 1024 px at the real presets), so galleries of all presets read alike.
GALLERY_TILE = 240
# The gallery's layout, in pixels: a row's caption above its panels, the space around panels, and
# the header (the title, when there is one, then the column headings).
GALLERY_CAPTION, GALLERY_GAP, GALLERY_TITLE, GALLERY_HEADINGS = 18, 4, 22, 18


def prediction_image(examples: list[dict], *, title: str = "", tile: int = GALLERY_TILE):
    """Rows of (image, ground truth, prediction) with the phrase (and an optional "note", e.g.
    the sample's IoU) above each row, as one PIL RGB image.

    Composed with Pillow rather than drawn with matplotlib: a train run logs one per epoch on
    rank 0 while the other ranks wait for it at the next epoch's data, and matplotlib took
    about 1.2 s of that wait on a CPU worker against a few milliseconds here (README, Performance).
    """
    from PIL import Image, ImageDraw

    font = _font(12)
    caption, gap = GALLERY_CAPTION, GALLERY_GAP
    header = (GALLERY_TITLE if title else 0) + GALLERY_HEADINGS
    width = 3 * tile + 4 * gap
    height = header + len(examples) * (caption + tile + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 4), title, fill="black", font=_font(14))
    for col, heading in enumerate(("image", "ground truth", "prediction")):
        draw.text((gap + col * (tile + gap), header - GALLERY_HEADINGS + 2), heading, fill="dimgray", font=font)
    top = header
    for ex in examples:
        note = f'  {ex["note"]}' if ex.get("note") else ""
        draw.text((gap, top + 2), f'"{ex["phrase"]}"{note}', fill="black", font=font)
        top += caption
        panels = (
            _panel(ex["image"].permute(1, 2, 0).numpy(), tile, Image.BILINEAR),
            _panel(ex["mask"].numpy(), tile, Image.NEAREST),
            _panel(ex["pred"].numpy(), tile, Image.NEAREST),
        )
        for col, panel in enumerate(panels):
            canvas.paste(panel, (gap + col * (tile + gap), top))
        top += tile + gap
    return canvas


def _panel(pixels, tile: int, resample):
    """One gallery panel: uint8 RGB [H, W, 3], or a 0/1 (or bool) mask [H, W] drawn white on black."""
    import numpy as np
    from PIL import Image

    array = np.asarray(pixels)
    if array.ndim == 2:
        array = (array > 0).astype(np.uint8) * 255
    image = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8, copy=False))).convert("RGB")
    return image.resize((tile, tile), resample)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's built-in scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()
