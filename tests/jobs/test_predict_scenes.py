"""`rsrefseg predict` on scenes as users bring them: GeoTIFFs larger than a tile, folders, phrases."""

from __future__ import annotations

import hashlib
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


def _hashed(phrase: str, slug: str) -> str:
    return f"{slug}-{hashlib.sha1(phrase.encode()).hexdigest()[:8]}"


def _reference_masks(checkpoint, images: list[np.ndarray], phrase: str) -> list[np.ndarray]:
    import rsrefseg

    model, cfg = rsrefseg.load_checkpoint(checkpoint)
    return rsrefseg.predict(model, cfg, images, phrase, device="cpu")


def test_a_folder_and_several_phrases_give_one_mask_each(ray_session, tiny_checkpoint, tmp_path):
    """A folder goes through Ray Data (model replicas as actors), one mask per image and phrase;
    images that share a stem (a.png, and a.tif without georeferencing, whose mask is a PNG too)
    keep their whole name in the mask's, so neither overwrites the other."""
    from PIL import Image

    folder = tmp_path / "scenes"
    folder.mkdir()
    rng = np.random.default_rng(1)
    a_png, a_tif = (rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(2))
    Image.fromarray(a_png).save(folder / "a.png")
    Image.fromarray(a_tif).save(folder / "a.tif")  # a plain TIFF: no CRS
    _geotiff(folder / "b.tif", 100, 90)
    out = tmp_path / "masks"
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(folder),
                 "--text", "vehicle in the parking area", "--text", "road", "--out", str(out), "--cpu"]) == 0
    vehicle = _hashed("vehicle in the parking area", "vehicle-in-the-parking-area")
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "a.png.road.png", f"a.png.{vehicle}.png", "a.tif.road.png", f"a.tif.{vehicle}.png",
        "b.road.tif", f"b.{vehicle}.tif"])
    expected = _reference_masks(tiny_checkpoint, [a_png, a_tif], "road")
    for name, mask in zip(("a.png.road.png", "a.tif.road.png"), expected):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)) > 0, mask)
    assert not np.array_equal(*expected)  # two images, two different masks


def test_phrases_that_share_a_slug_get_a_file_each(tiny_checkpoint, tmp_path):
    """Phrases that differ only in case, or only after 60 characters, used to share one file
    (the last one written won). A phrase that is not its own slug now carries 8 hex digits of
    its SHA-1; one that is ("road") keeps its plain name."""
    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    stem = "a" * 60
    phrases = ["Red car", "red car", f"{stem} one more!", f"{stem} two more?", "road"]
    out = tmp_path / "masks"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.png"), "--out", str(out)]
    assert main(args + [arg for phrase in phrases for arg in ("--text", phrase)]) == 0
    names = [f"img.{_hashed('Red car', 'red-car')}.png", f"img.{_hashed('red car', 'red-car')}.png",
             f"img.{_hashed(phrases[2], stem)}.png", f"img.{_hashed(phrases[3], stem)}.png", "img.road.png"]
    assert len(set(names)) == 5 and sorted(p.name for p in out.iterdir()) == sorted(names)
    masks = []
    for name, phrase in zip(names, phrases):
        masks.append(np.asarray(Image.open(out / name)) > 0)
        np.testing.assert_array_equal(masks[-1], _reference_masks(tiny_checkpoint, [rgb], phrase)[0])
    assert not np.array_equal(masks[2], masks[3])  # the 70-character phrases: two masks, not one


def test_a_tiled_16bit_geotiff_gives_the_whole_scene_mask_bit_for_bit(tiny_checkpoint, tmp_path):
    """A scene read window by window and stitched in row bands gives the mask the whole-scene
    path gave (the scene read whole, stretched between its 2nd and 98th percentiles, two
    scene-sized accumulators), bit for bit: 900 x 1300 px in 512 px tiles."""
    import rasterio

    from rsrefseg.inference.tiling import model_tile_predictor, tiles
    from rsrefseg.models.checkpoint import load_checkpoint
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.tokenizer import load_tokenizer

    scene, out = tmp_path / "scene.tif", tmp_path / "mask.tif"
    _geotiff(scene, 900, 1300, dtype=np.uint16)
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(scene), "--text", "vehicle",
                 "--out", str(out), "--tile", "512", "--cpu"]) == 0
    with rasterio.open(scene) as src:  # the whole-scene reading, as it was
        bands = src.read(indexes=[1, 2, 3])
    stretched = []
    for band in bands:
        low, high = np.percentile(band, (2, 98))
        scaled = (band.astype(np.float32) - low) / max(float(high - low), 1e-6)
        stretched.append((np.clip(scaled, 0, 1) * 255).astype(np.uint8))
    rgb = np.ascontiguousarray(np.stack(stretched).transpose(1, 2, 0))
    model, cfg = load_checkpoint(tiny_checkpoint)
    model.eval()
    predict = model_tile_predictor(model, input_sizes(cfg.model, cfg.data.label_size), load_tokenizer(cfg.model),
                                   "vehicle", torch_cpu())
    total, count = np.zeros((900, 1300), np.float32), np.zeros((900, 1300), np.float32)
    boxes = list(tiles(900, 1300, 512, 0.25))
    for i in range(0, len(boxes), 8):  # the whole-scene stitching, as it was
        chunk = boxes[i : i + 8]
        for (y, x, h, w), logits in zip(chunk, predict(np.stack([rgb[y : y + h, x : x + w] for y, x, h, w in chunk]))):
            total[y : y + h, x : x + w] += logits
            count[y : y + h, x : x + w] += 1.0
    with rasterio.open(out) as mask:
        np.testing.assert_array_equal(mask.read(1) > 0, total / count > 0)
    assert 0 < (total / count > 0).mean() < 1


def torch_cpu():
    import torch

    return torch.device("cpu")


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
    from rsrefseg.jobs.predict import training_scale
    from rsrefseg.platform.errors import ConfigError

    rgb = np.zeros((100, 200, 3), np.uint8)
    utm = Scene(rgb, {"crs": CRS.from_epsg(32633), "transform": None, "res": (0.3, 0.3)})
    assert training_scale(utm, 0.6, where="utm.tif") == 0.5  # 30 cm pixels to the model's 60 cm
    feet = Scene(rgb, {"crs": CRS.from_epsg(2263), "transform": None, "res": (1.0, 1.0)})  # US survey feet
    assert training_scale(feet, 0.6096) == pytest.approx(0.5, rel=1e-3)
    assert training_scale(utm, 0) == 1.0  # no --gsd: as it is
    assert training_scale(Scene(rgb), 0.6) == 1.0  # no georeferencing: as it is
    degrees = Scene(rgb, {"crs": CRS.from_epsg(4326), "transform": None, "res": (1e-5, 1e-5)})
    with pytest.raises(ConfigError, match=r"--gsd: wgs\.tif is in a geographic CRS"):
        training_scale(degrees, 0.5, where="wgs.tif")


def test_a_rescaled_geotiff_is_read_at_the_target_size_window_by_window(tmp_path):
    """--gsd reads the scene at the training scale (a WarpedVRT, bilinear), never at its own size
    first: whole or window by window, the pixels are a Pillow bilinear resize of the scene's,
    to within rounding."""
    from PIL import Image

    from rsrefseg.inference.scenes import open_scene, read_scene

    path = tmp_path / "scene.tif"
    _geotiff(path, 300, 410)
    full = read_scene(path).rgb
    resized = np.asarray(Image.fromarray(full).resize((205, 150), Image.BILINEAR)).astype(int)
    with open_scene(path) as scene:
        scene.rescale(0.5)
        assert (scene.height, scene.width, scene.scene_shape) == (150, 205, (300, 410))
        whole = scene.read(0, 0, 150, 205).astype(int)
        window = scene.read(37, 51, 64, 80).astype(int)
    assert np.abs(whole - resized).max() <= 1
    np.testing.assert_array_equal(window, whole[37 : 37 + 64, 51 : 51 + 80])  # no seams between windows
