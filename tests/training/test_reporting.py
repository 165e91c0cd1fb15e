"""The prediction gallery a train run logs every epoch (and `rsrefseg evaluate` once)."""

import threading

import numpy as np
import pytest
import torch

from rsrefseg.platform import tracking
from rsrefseg.inference.gallery import (
    GALLERY_CAPTION,
    GALLERY_GAP,
    GALLERY_HEADINGS,
    GALLERY_TITLE,
    Gallery,
    prediction_image,
)
from rsrefseg.training.reporting import EpochLogger
from tests.models.helpers import tiny_config


def _example(seed: int, side: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(side, side, dtype=torch.uint8)
    mask[: side // 2, : side // 4] = 1  # the top-left block
    pred = torch.zeros(side, side, dtype=torch.bool)
    pred[side // 2:, side // 2:] = True  # the bottom-right block
    image = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=g)
    return {"image": image, "mask": mask, "pred": pred, "phrase": f"phrase {seed}", "note": "IoU 0.00"}


def _panel(canvas: np.ndarray, row: int, col: int, tile: int, header: int) -> np.ndarray:
    caption, gap = GALLERY_CAPTION, GALLERY_GAP
    top = header + row * (caption + tile + gap) + caption
    left = gap + col * (tile + gap)
    return canvas[top:top + tile, left:left + tile]


def test_gallery_rows_hold_the_image_its_mask_and_the_prediction():
    tile = 64
    examples = [_example(0), _example(1)]
    canvas = np.asarray(prediction_image(examples, title="validation, epoch 3", tile=tile))
    header = GALLERY_TITLE + GALLERY_HEADINGS
    gap = GALLERY_GAP
    assert canvas.shape == (header + 2 * (GALLERY_CAPTION + tile + gap) + gap, 3 * tile + 4 * gap, 3)
    for row, ex in enumerate(examples):
        truth = _panel(canvas, row, 1, tile, header)[..., 0] > 127
        pred = _panel(canvas, row, 2, tile, header)[..., 0] > 127
        # Masks are scaled with nearest neighbours: 16 px -> 64 px is 4 x 4 per pixel.
        want_truth = np.kron(ex["mask"].numpy(), np.ones((4, 4), dtype=np.uint8)).astype(bool)
        want_pred = np.kron(ex["pred"].numpy().astype(np.uint8), np.ones((4, 4), dtype=np.uint8)).astype(bool)
        assert (truth == want_truth).all()
        assert (pred == want_pred).all()
        # The image panel is the sample's own RGB (bilinear upscaling keeps the mean colour).
        image = _panel(canvas, row, 0, tile, header).astype(float)
        assert np.allclose(image.mean(axis=(0, 1)), ex["image"].float().mean(dim=(1, 2)).numpy(), atol=4)
    first, second = (_panel(canvas, r, 0, tile, header) for r in range(2))
    assert not np.array_equal(first, second)


def test_gallery_keeps_the_worst_and_the_best_samples():
    gallery = Gallery(2)
    side = 4
    for start in (0, 4):
        ious = [0.1 * (start + i) for i in range(4)]
        batch = {"id": [f"s{start + i}" for i in range(4)], "phrase": [f"p{start + i}" for i in range(4)],
                 "sam_image": torch.zeros(4, 3, side, side, dtype=torch.uint8),
                 "mask": torch.zeros(4, side, side, dtype=torch.uint8)}
        gallery.offer(batch, torch.zeros(4, side, side, dtype=torch.bool), ious)
    examples = gallery.examples()
    assert [e["id"] for e in examples] == ["s0", "s1", "s6", "s7"]
    assert [e["note"].split()[-1] for e in examples] == ["(worst)", "(worst)", "(best)", "(best)"]
    assert all("batch" not in e and e["image"].shape == (3, side, side) for e in examples)


def _logger(tmp_path):
    cfg = tiny_config([f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=t"])
    run_id = tracking.create_run(cfg, run_name="logger")
    return cfg, run_id, EpochLogger(cfg, run_id, enabled=True)


def test_epoch_logger_writes_everything_in_order_by_close(tmp_path):
    cfg, run_id, logger = _logger(tmp_path)
    for step in (20, 40, 60):
        logger.log_step({"train/loss": 1.0 / step}, step)
    logger.log_epoch({"val/gIoU": 12.5, "epoch": 1}, 1, [_example(0), _example(1)])
    logger.log_step({"train/loss": 0.5}, 40)  # a step replayed after a restart: logged once
    logger.close()

    client = logger.client
    losses = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in losses] == [(20, 1 / 20), (40, 1 / 40), (60, 1 / 60)]
    assert [m.value for m in client.get_metric_history(run_id, "val/gIoU")] == [12.5]
    gallery = [a.path for a in client.list_artifacts(run_id, "val_predictions")]
    assert gallery == ["val_predictions/epoch_001.png"]
    # A logger for the same run (a restarted worker) sees what is there and skips it.
    again = EpochLogger(cfg, run_id, enabled=True)
    again.log_step({"train/loss": 9.0}, 60)
    again.log_epoch({"val/gIoU": 99.0, "epoch": 1}, 1, [])
    again.close()
    assert len(client.get_metric_history(run_id, "train/loss")) == 3
    assert [m.value for m in client.get_metric_history(run_id, "val/gIoU")] == [12.5]


def test_a_failing_store_fails_the_run_at_a_later_call_or_at_close(tmp_path):
    _, _, logger = _logger(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("the tracking store is gone")

    logger.client.log_batch = broken
    logger.log_step({"train/loss": 1.0}, 1)  # queued; fails in the background
    with pytest.raises(OSError, match="store is gone"):
        logger.close()

    # A worker whose training already failed flushes what it queued without raising the store's
    # error instead of its own.
    _, _, failing = _logger(tmp_path / "again")
    release, calls = threading.Event(), []

    def broken_once_released(*args, **kwargs):
        release.wait(5)
        calls.append(kwargs)
        raise OSError("the tracking store is gone")

    failing.client.log_batch = broken_once_released
    failing.log_step({"train/loss": 1.0}, 1)
    failing.log_step({"train/loss": 2.0}, 2)  # both queued before either fails
    release.set()
    failing.close(check=False)
    assert len(calls) == 2


def test_logging_does_not_wait_for_the_store(tmp_path):
    """Rank 0 hands its writes to a thread: a slow store must not hold up its steps (every
    rank waits for rank 0 at the next gradient exchange)."""
    _, run_id, logger = _logger(tmp_path)
    release, written = threading.Event(), []
    real = logger.client.log_batch

    def slow(*args, **kwargs):
        release.wait(5)
        written.append(kwargs)
        return real(*args, **kwargs)

    logger.client.log_batch = slow
    logger.log_step({"train/loss": 1.0}, 1)
    logger.log_epoch({"val/gIoU": 3.0, "epoch": 1}, 1, [_example(0)])
    assert written == []  # both calls returned while the store was still busy
    release.set()
    logger.close()
    assert len(written) == 2
    assert [m.value for m in logger.client.get_metric_history(run_id, "val/gIoU")] == [3.0]
