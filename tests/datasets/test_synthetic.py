"""The synthetic set: determinism, RefSegRS layout, and phrases that decide the masks."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict

import numpy as np
import pytest

from rsrefseg.datasets.refsegrs import read_refsegrs
from rsrefseg.datasets.synthetic import PHRASES, VEHICLE_SCALE, generate, make_scene, pick_phrases, split_sizes
from rsrefseg.datasets.triplet import DatasetError


def _by_image(triplets):
    groups = defaultdict(list)
    for t in triplets:
        groups[hashlib.sha256(t.load_image().tobytes()).hexdigest()].append(t)
    return groups


def test_round_trips_through_the_refsegrs_reader(synthetic_root):
    triplets = list(read_refsegrs(synthetic_root))
    assert len(triplets) == 40
    counts = {s: sum(t.split == s for t in triplets) for s in ("train", "val", "test")}
    assert counts == {"train": 24, "val": 4, "test": 12}  # ~60/10/30
    for t in triplets[:6]:
        image, mask = t.load_image(), t.load_mask()
        assert image.shape == (512, 512, 3) and image.dtype == np.uint8
        assert mask.shape == (512, 512) and mask.any()
        assert t.phrase in PHRASES
    assert "SYNTHETIC" in (synthetic_root / "README.txt").read_text()
    assert json.loads((synthetic_root / "synthetic.json").read_text())["seed"] == 0


def test_one_scene_never_straddles_two_splits(synthetic_root):
    for group in _by_image(read_refsegrs(synthetic_root)).values():
        assert len({t.split for t in group}) == 1


def test_same_image_different_phrases_different_masks(synthetic_root):
    groups = [g for g in _by_image(read_refsegrs(synthetic_root)).values() if len(g) > 1]
    assert len(groups) >= 5
    ious = []
    for group in groups:
        masks = [t.load_mask() for t in group]
        assert len({t.phrase for t in group}) == len(group)
        for a, b in itertools.combinations(masks, 2):
            assert not np.array_equal(a, b)
            ious.append((a & b).sum() / max((a | b).sum(), 1))
    # The phrase decides: one mask per image cannot fit its phrases (a text-blind model fails).
    assert np.mean(ious) < 0.2


def test_masks_follow_phrase_semantics():
    checked = 0
    for seed in range(12):
        scene = make_scene(seed)
        vehicle = scene.mask("vehicle")
        for narrower in ("vehicle in the parking area", "vehicle along the road", "car", "truck", "white car", "light-duty vehicle"):
            assert not (scene.mask(narrower) & ~vehicle).any(), narrower  # inclusion, as in RefSegRS
        parked, on_road = scene.mask("vehicle in the parking area"), scene.mask("vehicle along the road")
        assert not (parked & on_road).any()
        np.testing.assert_array_equal(vehicle, parked | on_road)  # every vehicle is parked or driving
        checked += bool(parked.any())
        np.testing.assert_array_equal(scene.mask("light-duty vehicle"), scene.mask("car") | scene.mask("van"))
        np.testing.assert_array_equal(scene.mask("heavy-duty vehicle"), scene.mask("truck"))
        assert not (scene.mask("tree near the building") & ~scene.mask("tree")).any()
        assert not (scene.mask("building along the road") & ~scene.mask("building")).any()
        assert not (scene.mask("road") & scene.mask("building")).any()
    assert checked >= 5


def test_vehicles_in_the_parking_area_lie_inside_it():
    for seed in range(8):
        scene = make_scene(seed)
        parked = scene.mask("vehicle in the parking area")
        if not parked.any():
            continue
        lot = scene.mask("parking area") | parked
        ys, xs = np.nonzero(lot)
        inside = np.zeros_like(lot)
        inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        assert not (parked & ~inside).any()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = generate(tmp_path / "a", size=12, seed=7)
    b = generate(tmp_path / "b", size=12, seed=7)
    c = generate(tmp_path / "c", size=12, seed=8)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "images" / "0.tif").read_bytes() != (c / "images" / "0.tif").read_bytes()


def test_every_phrase_in_the_vocabulary_occurs():
    seen = set()
    for seed in range(30):
        seen.update(make_scene(seed).valid_phrases())
    assert seen == set(PHRASES)


def test_pick_phrases_prefers_distinct_families():
    rng = np.random.default_rng(0)
    scene = make_scene(3)
    chosen = pick_phrases(scene, 4, rng)
    assert len({PHRASES[p].family for p in chosen}) == 4


def test_split_sizes_and_tiny_sizes():
    assert split_sizes(300) == {"train": 180, "val": 30, "test": 90}
    assert split_sizes(3) == {"train": 1, "val": 1, "test": 1}
    with pytest.raises(ValueError):
        split_sizes(2)


def test_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("x")
    with pytest.raises(DatasetError, match="not a synthetic dataset"):
        generate(tmp_path / "mine", size=3)
    assert (tmp_path / "mine" / "data.csv").exists()
    out = generate(tmp_path / "syn", size=3, seed=0)
    assert generate(out, size=4, seed=1) == out  # its own output is replaced
    assert sum(1 for _ in read_refsegrs(out)) == 4


def test_a_few_hundred_samples_in_seconds(tmp_path):
    import time

    start = time.perf_counter()
    generate(tmp_path / "syn", size=120, seed=1)
    assert time.perf_counter() - start < 20  # ~3 s here; generous for slow CI machines


def test_categories_stay_apart_at_low_resolution():
    """What a tiny CNN at 64 px sees: every building roof and tree crown, averaged after an 8x
    downsampling, is far in colour from the road and the low vegetation around it."""
    from PIL import Image

    def small(array):
        return np.asarray(Image.fromarray(array).resize((64, 64), Image.BILINEAR)).astype(float)

    for seed in range(6):
        scene = make_scene(seed)
        image = small(scene.image)
        def mean_of(mask):
            m = small(mask.astype(np.uint8) * 255) > 250
            return image[m].mean(axis=0) if m.sum() >= 2 else None

        stuff = {name: mean_of(scene.mask(name)) for name in ("road", "low vegetation")}
        for obj in scene.objects:
            if obj.kind not in ("building", "tree"):
                continue
            colour = mean_of(scene.instances == obj.id)
            if colour is None:
                continue
            for name, ref in stuff.items():
                assert np.linalg.norm(colour - ref) > 30, (seed, obj.kind, obj.colour, name)


def test_objects_are_drawn_at_refsegrs_scale_and_vehicles_at_vehicle_scale():
    # About 13 cm per pixel: a car (4.5 x 2 m) covers ~35 x 16 px, a truck over twice its length;
    # vehicles are then drawn VEHICLE_SCALE times larger (so that the tiny preset sees them).
    areas = defaultdict(list)
    for seed in range(10):
        scene = make_scene(seed)
        for obj in scene.objects:
            areas[obj.kind].append(int((scene.instances == obj.id).sum()))
    cars = sorted(areas["car"])
    assert len(cars) >= 20
    scale2 = VEHICLE_SCALE**2
    assert 480 * scale2 <= cars[len(cars) // 2] <= 650 * scale2  # median: whole cars (32-38 x 15-17 px)
    assert np.median(areas["truck"]) > 2.5 * np.median(cars)
    assert np.median(areas["building"]) > 5 * np.median(cars) / scale2
    # Buildings and trees stay at RefSegRS's scale: 48-112 x 40-80 px, crowns 28-52 px across.
    assert 2500 <= np.median(areas["building"]) <= 6000
    assert 600 <= np.median(areas["tree"]) <= 2100


def test_vehicles_fit_their_lanes_and_stalls():
    """Every kind drives on the roads and cars and vans park: at VEHICLE_SCALE they still fit."""
    kinds = defaultdict(set)
    for seed in range(16):
        for obj in make_scene(seed).objects:
            kinds[obj.kind] |= set(obj.tags)
    assert {"on_road"} <= kinds["truck"] and {"on_road", "in_parking"} <= kinds["car"] & kinds["van"]
