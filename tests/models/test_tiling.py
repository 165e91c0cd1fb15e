"""Large scenes: the tile grid covers every pixel and stitching leaves no seams."""

from __future__ import annotations

import numpy as np
import pytest

from rsrefseg.inference.tiling import predict_scene, tile_starts, tiles


@pytest.mark.parametrize("length,tile,overlap", [(1000, 256, 0.25), (256, 256, 0.5), (100, 256, 0.25), (513, 512, 0.0)])
def test_tiles_cover_the_scene_and_end_flush(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all() and starts[0] == 0 and min(length, starts[-1] + tile) == length
    if len(starts) > 1:
        assert max(np.diff(starts)) <= round(tile * (1 - overlap))  # at least the asked overlap


def test_stitched_mask_equals_the_per_pixel_rule_with_no_seams():
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (700, 1100, 3), dtype=np.uint8)
    calls = []

    def red_is_the_target(batch):  # a "model" whose answer depends on the pixel alone
        calls.append(len(batch))
        return batch[..., 0].astype(np.float32) - 127.5

    mask = predict_scene(scene, red_is_the_target, tile=256, overlap=0.25, batch=4)
    np.testing.assert_array_equal(mask, scene[..., 0] > 127)
    n_tiles = len(list(tiles(700, 1100, 256, 0.25)))
    assert sum(calls) == n_tiles and max(calls) == 4
