"""`rsrefseg predict` on scenes as users bring them: GeoTIFFs larger than a tile, folders, phrases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rsrefseg.cli import main


def _geotiff(path: Path, height: int, width: int, dtype=np.uint8):
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    high = 256 if dtype == np.uint8 else 4000
    bands = rng.integers(0, high, (4, height, width)).astype(dtype)  # RGB + NIR, as many sensors ship
    transform = from_origin(500000.0, 5200000.0, 0.3, 0.3)  # UTM metres, 30 cm pixels
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=4, dtype=bands.dtype,
                       crs="EPSG:32633", transform=transform) as dst:
        dst.write(bands)
    return transform


def test_a_large_geotiff_gives_a_georeferenced_mask_and_polygons(tiny_checkpoint, tmp_path):
    import rasterio

    scene = tmp_path / "scene.tif"
    transform = _geotiff(scene, 600, 2300, dtype=np.uint16)  # wider than 2048 px: tiled
    out = tmp_path / "mask.tif"
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(scene), "--text", "vehicle",
                 "--out", str(out), "--tile", "512", "--geojson"]) == 0
    with rasterio.open(out) as mask:
        assert mask.crs.to_epsg() == 32633 and mask.transform == transform
        assert (mask.height, mask.width) == (600, 2300)
        values = mask.read(1)
    assert set(np.unique(values)) <= {0, 255}
    collection = json.loads(out.with_suffix(".geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "EPSG:32633"
    assert len(collection["features"]) > 0 or not values.any()
    for feature in collection["features"][:20]:  # polygon corners lie inside the scene's footprint
        xs, ys = zip(*feature["geometry"]["coordinates"][0])
        assert 500000.0 <= min(xs) and max(xs) <= 500000.0 + 2300 * 0.3
        assert 5200000.0 - 600 * 0.3 <= min(ys) and max(ys) <= 5200000.0


def test_a_folder_and_several_phrases_give_one_mask_each(ray_session, tiny_checkpoint, tmp_path):
    """A folder goes through Ray Data (model replicas as actors), one mask per image and phrase."""
    from PIL import Image

    folder = tmp_path / "scenes"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(folder / "a.png")
    _geotiff(folder / "b.tif", 100, 90)
    out = tmp_path / "masks"
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(folder),
                 "--text", "vehicle in the parking area", "--text", "road", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a.road.png", "a.vehicle-in-the-parking-area.png", "b.road.tif", "b.vehicle-in-the-parking-area.tif"]
    assert np.asarray(Image.open(out / "a.road.png")).shape == (120, 160)


def test_predict_input_errors_name_the_problem(tiny_checkpoint, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "none.tif"),
                 "--text", "road", "--out", str(tmp_path / "m.png")]) == 2
    assert "none.tif: no such file or folder" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path),
                 "--text", "road", "--out", str(tmp_path / "m")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_gsd_resamples_by_metres_per_pixel_and_refuses_degrees():
    import pytest
    from rasterio.crs import CRS

    from rsrefseg.inference.scenes import Scene
    from rsrefseg.jobs.predict import _to_training_scale
    from rsrefseg.platform.errors import ConfigError

    rgb = np.zeros((100, 200, 3), np.uint8)
    utm = Scene(rgb, {"crs": CRS.from_epsg(32633), "transform": None, "res": (0.3, 0.3)})
    scaled, factor = _to_training_scale(utm, 0.6, where="utm.tif")  # 30 cm pixels to the model's 60 cm
    assert factor == 0.5 and scaled.shape == (50, 100, 3)
    feet = Scene(rgb, {"crs": CRS.from_epsg(2263), "transform": None, "res": (1.0, 1.0)})  # US survey feet
    assert _to_training_scale(feet, 0.6096)[1] == pytest.approx(0.5, rel=1e-3)
    assert _to_training_scale(utm, 0)[1] == 1.0  # no --gsd: as it is
    degrees = Scene(rgb, {"crs": CRS.from_epsg(4326), "transform": None, "res": (1e-5, 1e-5)})
    with pytest.raises(ConfigError, match=r"--gsd: wgs\.tif is in a geographic CRS"):
        _to_training_scale(degrees, 0.5, where="wgs.tif")
