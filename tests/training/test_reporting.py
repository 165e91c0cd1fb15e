"""The prediction gallery a train run logs every epoch (and `rsrefseg evaluate` once)."""

import numpy as np
import torch

from rsrefseg.training.reporting import (
    GALLERY_CAPTION,
    GALLERY_GAP,
    GALLERY_HEADINGS,
    GALLERY_TITLE,
    Gallery,
    prediction_image,
)


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
