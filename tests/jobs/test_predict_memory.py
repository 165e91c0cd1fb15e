"""`rsrefseg predict` on a scene far larger than a tile keeps its memory to the mask and a band of
rows: the scene is read one tile window at a time, the logits are stitched in row bands, the
GeoTIFF mask is written window by window, and --gsd reads the scene at the training scale.

The whole-scene path this replaces needed, for a 6,000 x 6,000 scene, the scene (108 MB as
8-bit RGB, twice that as read from 16-bit bands), two float32 accumulators (288 MB) and the mask
(36 MB). Measured with this test's child (2 CPUs, tiny model, 16-bit RGB+NIR scene): the
whole-scene path raised the peak RSS by 858 MiB (851 MiB with --gsd 0.6), the windowed path by
95 MiB (102 MiB with --gsd 0.6). The limit is half of the whole-scene path's 12 bytes a pixel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

SIDE = 6000  # px: 36 Mpx
BLOCK = 256

# In a child process: warm up (imports, the model, a batch of tiles, rasterio's warping), then
# for each call reset the peak (VmHWM) to the current RSS and measure how far predict raises it.
CHILD = r"""
import json, sys
from rsrefseg.cli import main

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def peak_above_baseline(args):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    baseline = status("VmRSS")
    assert main(args) == 0
    return status("VmHWM") - baseline

checkpoint, scene, small, out = sys.argv[1:5]
common = ["predict", "--checkpoint", checkpoint, "--text", "vehicle", "--cpu"]
assert main(common + ["--image", small, "--out", out + "/warm.tif", "--tile", "512"]) == 0
assert main(common + ["--image", small, "--out", out + "/warm-gsd.tif", "--tile", "256", "--gsd", "0.6"]) == 0
whole = peak_above_baseline(common + ["--image", scene, "--out", out + "/mask.tif"])
gsd = peak_above_baseline(common + ["--image", scene, "--out", out + "/mask-gsd.tif", "--gsd", "0.6"])
print("PEAKS " + json.dumps({"whole": whole, "gsd": gsd}))
"""


def _write_scene(path: Path, height: int, width: int) -> None:
    """A 16-bit RGB+NIR GeoTIFF (30 cm pixels, UTM), tiled and deflate-compressed, written block
    by block: a few MB on disk, 288 MB of pixels."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500000.0, 5200000.0, 0.3, 0.3),
                       tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate") as dst:
        for y in range(0, height, BLOCK):
            for x in range(0, width, BLOCK):
                h, w = min(BLOCK, height - y), min(BLOCK, width - x)
                yy, xx = np.mgrid[y : y + h, x : x + w]
                v = ((np.sin(yy / 97.0) + np.cos(xx / 61.0)) * 60 + 128).astype(np.uint16)
                dst.write(np.stack([v * 7, v * 3, v * 11, v]), window=Window(x, y, w, h))


def test_a_36_megapixel_geotiff_is_predicted_in_a_fraction_of_the_whole_scene_memory(tiny_checkpoint, tmp_path):
    import rasterio

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs: the peak RSS cannot be reset")
    scene, small = tmp_path / "scene.tif", tmp_path / "small.tif"
    _write_scene(scene, SIDE, SIDE)
    _write_scene(small, 900, 1300)
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint), str(scene), str(small), str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    peaks = json.loads(next(line[6:] for line in done.stdout.splitlines() if line.startswith("PEAKS ")))
    whole_scene_path = SIDE * SIDE * (3 + 2 * 4 + 1)  # 8-bit scene, two float32 accumulators, the mask
    for run, peak in peaks.items():
        assert peak < whole_scene_path / 2, (
            f"{run}: predict raised the peak RSS by {peak / 2**20:.0f} MiB; the whole-scene path needs "
            f"{whole_scene_path / 2**20:.0f} MiB, the limit is half of that")
    for name in ("mask.tif", "mask-gsd.tif"):
        with rasterio.open(tmp_path / name) as mask:
            assert (mask.height, mask.width) == (SIDE, SIDE) and mask.crs.to_epsg() == 32633
