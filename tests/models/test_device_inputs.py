"""Device-side preprocessing (models.device_inputs) against the CPU reference it replaced
(Pillow's BILINEAR and NEAREST, `pipeline.resize_image` / `resize_mask`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rsrefseg.datasets.pipeline import resize_image, resize_mask
from rsrefseg.models.device_inputs import model_batch, resize_images, resize_masks, unpack_masks
from rsrefseg.models.sizes import InputSizes


def aerial_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth structure plus sensor noise: both the edges and the flat areas a resize meets."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(int)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


# (source height, width, model input): the real presets' resizes (RefSegRS 512 and RRSIS-D 800
# to SAM's 1024 and SigLIP's 384), tiny's downsizing, and odd, non-square sizes.
RESIZES = [(512, 512, 1024), (512, 512, 384), (800, 800, 384), (512, 512, 64), (37, 53, 64), (64, 64, 24)]


@pytest.mark.parametrize(("height", "width", "size"), RESIZES)
def test_images_resized_on_the_device_match_the_cpu_reference_within_one_level(height, width, size):
    image = aerial_like(height, width, seed=size)
    reference = resize_image(image, size).astype(int)  # Pillow, [3, size, size]
    got = resize_images(torch.from_numpy(image)[None], size)
    assert got.dtype == torch.uint8 and got.shape == (1, 3, size, size)
    diff = np.abs(got[0].numpy().astype(int) - reference)
    assert diff.max() <= 1  # rounding of the last bit, nothing else
    assert diff.mean() < 0.3


@pytest.mark.parametrize("height", [7, 37, 512, 800])
@pytest.mark.parametrize("size", [24, 100, 384, 512, 1024])
def test_masks_resized_on_the_device_equal_pillows_nearest(height, size):
    mask = np.random.default_rng(height * size).random((height, height + 3)) < 0.4
    got = resize_masks(torch.from_numpy(mask)[None], size)[0].numpy()
    np.testing.assert_array_equal(got, resize_mask(mask, size))


@pytest.mark.parametrize("width", [8, 13, 37])
def test_packed_masks_unpack_to_the_original_bits(width):
    masks = np.random.default_rng(width).random((3, 5, width)) < 0.5
    packed = torch.from_numpy(np.packbits(masks, axis=-1))
    np.testing.assert_array_equal(unpack_masks(packed, [width] * 3).numpy(), masks)


def pipeline_batch(images: list[np.ndarray], masks: list[np.ndarray], *, stacked: bool) -> dict:
    """A batch as the data pipeline hands it over: stacked tensors when every sample has the
    same size, else one tensor per sample."""
    packed = [torch.from_numpy(np.packbits(m, axis=-1)) for m in masks]
    pixels = [torch.from_numpy(i) for i in images]
    n = len(images)
    return {
        "image": torch.stack(pixels) if stacked else pixels,
        "mask": torch.stack(packed) if stacked else packed,
        "height": torch.tensor([m.shape[0] for m in masks]),
        "width": torch.tensor([m.shape[1] for m in masks]),
        "input_ids": torch.arange(n * 4).view(n, 4),
        "attention_mask": torch.ones(n, 4, dtype=torch.int64),
        "id": [str(k) for k in range(n)], "phrase": ["road"] * n, "category": ["road"] * n,
    }


SIZES = InputSizes(sam_image=48, siglip_image=20, label=16, max_text_len=4)


def test_model_batch_of_mixed_sizes_equals_the_per_sample_cpu_reference():
    shapes = [(40, 40), (33, 50), (40, 40)]
    images = [aerial_like(h, w, seed=k) for k, (h, w) in enumerate(shapes)]
    masks = [np.random.default_rng(k).random((h, w)) < 0.3 for k, (h, w) in enumerate(shapes)]
    got = model_batch(pipeline_batch(images, masks, stacked=False), SIZES, "cpu", originals=True)
    assert got["sam_image"].shape == (3, 3, 48, 48) and got["siglip_image"].shape == (3, 3, 20, 20)
    for k, (image, mask) in enumerate(zip(images, masks)):
        assert np.abs(got["sam_image"][k].numpy().astype(int) - resize_image(image, 48)).max() <= 1
        assert np.abs(got["siglip_image"][k].numpy().astype(int) - resize_image(image, 20)).max() <= 1
        np.testing.assert_array_equal(got["mask"][k].numpy(), resize_mask(mask, 16))
        np.testing.assert_array_equal(got["mask_original"][k].numpy(), mask)  # scored at its own size
    assert got["id"] == ["0", "1", "2"] and got["input_ids"].shape == (3, 4)
    # stacked (one size) and per-sample batches give the same result
    same = model_batch(pipeline_batch(images[::2], masks[::2], stacked=True), SIZES, "cpu")
    torch.testing.assert_close(same["sam_image"], got["sam_image"][::2])
    torch.testing.assert_close(same["mask"], got["mask"][::2])
    assert "mask_original" not in same


def test_flips_move_a_samples_images_and_mask_together_and_differ_between_samples():
    n = 32
    images = [aerial_like(16, 16, seed=k) for k in range(n)]
    masks = [np.random.default_rng(k).random((16, 16)) < 0.5 for k in range(n)]
    sizes = InputSizes(sam_image=16, siglip_image=16, label=16, max_text_len=4)  # no resizing
    got = model_batch(pipeline_batch(images, masks, stacked=True), sizes, "cpu", augment=True,
                      generator=torch.Generator().manual_seed(0))
    flips = {"none": lambda a: a, "h": lambda a: a[..., ::-1], "v": lambda a: a[..., ::-1, :], "hv": lambda a: a[..., ::-1, ::-1]}
    used = []
    for k in range(n):
        image = images[k].transpose(2, 0, 1)
        match = [name for name, f in flips.items() if np.array_equal(got["sam_image"][k].numpy(), f(image))]
        assert len(match) == 1, k
        np.testing.assert_array_equal(got["siglip_image"][k].numpy(), flips[match[0]](image))
        np.testing.assert_array_equal(got["mask"][k].numpy(), flips[match[0]](masks[k].astype(np.uint8)))
        used.append(match[0])
    assert set(used) == set(flips)  # 32 samples: every combination drawn
    with pytest.raises(ValueError, match="never augmented"):
        model_batch(pipeline_batch(images, masks, stacked=True), sizes, "cpu", augment=True, originals=True)
