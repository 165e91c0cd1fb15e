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


def _whole_scene_stitching(rgb, predict, *, tile, overlap, batch):
    """The stitching as it was before row bands, kept as the reference: two float32
    accumulators the size of the whole scene."""
    height, width = rgb.shape[:2]
    total = np.zeros((height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    boxes = list(tiles(height, width, tile, overlap))
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        logits = predict(np.stack([rgb[y : y + h, x : x + w] for y, x, h, w in chunk]))
        for (y, x, h, w), tile_logits in zip(chunk, logits):
            total[y : y + h, x : x + w] += tile_logits
            count[y : y + h, x : x + w] += 1.0
    return total / count > 0


def _tiles_disagree(batch):
    """A "model" whose logits depend on the whole tile (a content-seeded offset and a ramp
    across it), so overlapping tiles disagree and the averaging decides many pixels."""
    n, h, w = batch.shape[:3]
    out = batch.astype(np.float32).mean(-1) - 127.5
    for i in range(n):
        rng = np.random.default_rng(int(batch[i, ::7, ::5].sum()))
        out[i] += rng.normal(0, 40) + np.linspace(-30, 30, w, dtype=np.float32)[None, :] * rng.choice([-1, 1])
    return out


@pytest.mark.parametrize("height,width,tile,overlap,batch", [
    (900, 1300, 512, 0.25, 8),  # the brief's scene: 3 x 4 tiles
    (1300, 900, 512, 0.5, 3),  # batches that end mid-row
    (2100, 300, 256, 0.25, 8),  # one tile a row: a batch spans eight tile rows
    (513, 700, 512, 0.0, 2),  # no overlap, a last tile row one px below the first
    (100, 80, 256, 0.25, 8),  # one tile, smaller than the tile side
])
def test_band_stitching_gives_the_whole_scene_mask_bit_for_bit(height, width, tile, overlap, batch):
    scene = np.random.default_rng(height + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = predict_scene(scene, _tiles_disagree, tile=tile, overlap=overlap, batch=batch)
    reference = _whole_scene_stitching(scene, _tiles_disagree, tile=tile, overlap=overlap, batch=batch)
    assert mask.dtype == bool and mask.shape == (height, width)
    np.testing.assert_array_equal(mask, reference)
    assert 0.05 < (mask != (scene.mean(-1) > 127.5)).mean() or height * width < 10**5  # overlaps mattered


def test_rows_are_finished_while_tiles_below_are_still_unread():
    """A scene read tile by tile is stitched in row bands: the rows above the next tile are
    final as soon as a batch is done, so they leave the accumulators (and the reader has not
    been asked for what lies below)."""
    from rsrefseg.inference.tiling import stitch_phrase_rows

    height, width, tile = 3000, 1000, 512
    read_rows = []

    def read(y, x, h, w):
        read_rows.append(y + h)
        return np.add.outer(np.arange(y, y + h), np.arange(x, x + w)).astype(np.uint8)[..., None].repeat(3, -1)

    bands = []
    def one_phrase(batch):
        return [red_is_the_target(batch)]

    for top, (rows,) in stitch_phrase_rows(read, height, width, one_phrase, tile=tile, overlap=0.25, batch=4):
        bands.append((top, len(rows), max(read_rows)))
        assert rows.shape == (len(rows), width) and rows.dtype == bool
    tops = [top for top, _, _ in bands]
    assert tops[0] == 0 and tops == sorted(tops) and sum(n for _, n, _ in bands) == height
    assert all(top + n == nxt for (top, n, _), nxt in zip(bands, tops[1:] + [height]))  # contiguous
    assert len(bands) > 4 and bands[0][2] <= 2 * tile  # the first rows came out after the first tile rows


def red_is_the_target(batch):
    return batch[..., 0].astype(np.float32) - 127.5


def _made_up_scene(y, x, h, w):
    return (np.add.outer(np.arange(y, y + h), np.arange(x, x + w)) % 256).astype(np.uint8)[..., None].repeat(3, -1)


@pytest.mark.parametrize("source", ["tile reader", "array in memory"])
def test_stitching_needs_memory_for_the_mask_not_for_scene_sized_logits(source):
    """Peak traced memory of stitching a 24,000 x 1,500 scene: the mask (1 byte a pixel) and a band
    of rows, where the whole-scene accumulators alone were 8 bytes a pixel (13 in all, with the
    division's temporary). Tiles come from a reader (`predict_tiles`, as `rsrefseg predict` reads
    a GeoTIFF) or from an array allocated before tracing (`predict_scene`, the public API's path)."""
    import tracemalloc

    height, width = 24000, 1500
    scene = _made_up_scene(0, 0, height, width) if source == "array in memory" else None
    tracemalloc.start()
    try:
        if scene is None:
            from rsrefseg.inference.tiling import predict_tiles

            mask = predict_tiles(_made_up_scene, height, width, red_is_the_target, tile=512, overlap=0.25)
        else:
            mask = predict_scene(scene, red_is_the_target, tile=512, overlap=0.25)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(mask, _made_up_scene(0, 0, height, width)[..., 0] > 127)
    assert peak < 3 * height * width, f"{peak / 2**20:.0f} MB traced for a {height * width / 1e6:.0f} Mpx scene"
