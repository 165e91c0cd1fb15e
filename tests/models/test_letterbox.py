"""Letterboxed inputs (RSRefSeg-2: keep the aspect ratio, pad to the square) on the way in, and
scoring of the image area only on the way out."""

from __future__ import annotations

import numpy as np
import torch

from rsrefseg.inference.scoring import score_batch
from rsrefseg.models.device_inputs import crop_valid, fit_inside, letterbox_masks, model_batch
from rsrefseg.models.sizes import IGNORE_LABEL, InputSizes

SIZES = InputSizes(sam_image=32, siglip_image=16, label=16, max_text_len=4, keep_ratio=True)


def pipeline_batch(images: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """A data-pipeline batch as the Ray Data stream gives it: pixels at their own size, masks
    bit-packed MSB first."""
    return {
        "image": images,
        "mask": [np.packbits(m.astype(bool), axis=1) for m in masks],
        "height": np.array([m.shape[0] for m in masks]),
        "width": np.array([m.shape[1] for m in masks]),
        "input_ids": np.zeros((len(images), 4), np.int64),
        "attention_mask": np.ones((len(images), 4), np.int64),
        "id": [f"s{i}" for i in range(len(images))],
    }


def test_a_wide_image_keeps_its_shape_and_its_padding_is_ignored():
    image = np.full((20, 40, 3), 200, np.uint8)  # 1:2, wide
    mask = np.zeros((20, 40), np.uint8)
    mask[5:15, 10:30] = 1
    out = model_batch(pipeline_batch([image], [mask]), SIZES, "cpu")
    assert fit_inside(20, 40, 32) == (16, 32)
    sam = out["sam_image"][0]
    assert sam.shape == (3, 32, 32)
    assert (sam[:, :16] == 200).all() and (sam[:, 16:] == 0).all()  # image on top, zero padding below
    siglip = out["siglip_image"][0]  # the whole canvas, resized: the padding comes along
    assert (siglip[:, :7] == 200).all() and (siglip[:, 9:] == 0).all()  # rows 7-8 blend at the edge
    label = out["mask"][0]
    assert (label[8:] == IGNORE_LABEL).all() and set(label[:8].unique().tolist()) == {0, 1}
    assert out["valid"] == [(8, 16)]
    assert label[:8].sum() == 4 * 8  # the 10 x 20 object at 0.4 x scale


def test_square_images_letterbox_as_a_plain_resize_and_tall_ones_pad_on_the_right():
    square = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    plain = model_batch(pipeline_batch([square], [np.ones((24, 24), np.uint8)]),
                        InputSizes(32, 16, 16, 4, keep_ratio=False), "cpu")
    boxed = model_batch(pipeline_batch([square], [np.ones((24, 24), np.uint8)]), SIZES, "cpu")
    assert torch.equal(plain["sam_image"], boxed["sam_image"]) and boxed["valid"] == [(16, 16)]
    tall = letterbox_masks(torch.ones(1, 40, 10, dtype=torch.bool), 16)
    assert (tall[0, :, :4] == 1).all() and (tall[0, :, 4:] == IGNORE_LABEL).all()


def test_scoring_compares_only_the_image_area_with_the_original_mask():
    image = np.zeros((20, 40, 3), np.uint8)
    mask = np.zeros((20, 40), np.uint8)
    mask[:, :20] = 1  # the left half
    tensors = model_batch(pipeline_batch([image], [mask]), SIZES, "cpu", originals=True)
    # Logits right on the image area, and "foreground" all over the padding: a model that is
    # right where the image is scores IoU 1, whatever it says on the padding.
    logits = torch.full((1, 16, 16), 5.0)
    logits[0, :8, 8:] = -5.0
    records = score_batch(logits, tensors)
    assert records["iou"] == [1.0]
    # Without the originals, at the label size: the same, on the label's image area.
    tensors.pop("mask_original")
    assert score_batch(logits, tensors)["iou"] == [1.0]
    assert [c.shape for c in crop_valid(logits, [(8, 16)])] == [(8, 16)]


def test_an_image_larger_than_the_input_keeps_its_aspect_through_the_pipeline_and_lines_up_with_its_label():
    """The data pipeline shrinks images larger than SAM's input before they travel; with
    keep_ratio it keeps their aspect, so the device letterboxes the image as it letterboxes the
    mask (stretching it instead would squeeze 100 rows of label into the image's 11)."""
    from rsrefseg.datasets.pipeline import Preprocessor

    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :150] = 255  # the left half bright
    mask = np.zeros((100, 300), np.uint8)
    mask[:, :150] = 1  # and it is the target
    shrunk = Preprocessor(sizes=SIZES, tokenizer=None).shrunk(image[None])
    assert shrunk.shape == (1, 11, 32, 3)  # fit inside 32 x 32 with the aspect kept
    out = model_batch(pipeline_batch([shrunk[0]], [mask]), SIZES, "cpu", originals=True)
    sam, label = out["sam_image"][0, 0], out["mask"][0]
    assert out["valid"] == [(5, 16)]
    assert (sam[:11, :15] == 255).all() and (sam[:11, 17:] == 0).all() and (sam[11:] == 0).all()
    assert (label[:5, :8] == 1).all() and (label[:5, 8:] == 0).all() and (label[5:] == IGNORE_LABEL).all()
    logits = torch.where(label == 1, 5.0, -5.0).float()[None]
    assert score_batch(logits, out)["iou"] == [1.0]
