"""RISBench, NWPU-Refer and RemoteSAM-270K: tiny copies in their published layouts (built from the
formats' documented facts, never by our own writer), prepared and read back from the shards."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from rsrefseg.datasets.nwpu_refer import read_nwpu_refer
from rsrefseg.datasets.prepare import load_manifest, prepare_dataset
from rsrefseg.datasets.remotesam import read_remotesam
from rsrefseg.datasets.risbench import read_risbench
from rsrefseg.datasets.triplet import DatasetError

from .conftest import Expected, random_image, random_mask

CHINESE = "左边的白色汽车"


def _png(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def _jpeg(path: Path, array: np.ndarray, fmt: str = "JPEG") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------
# RISBench: img_rgb/, mask/, output_phrase_{split}.txt, "<file name> <sentence>"

RISBENCH_LINES = {
    "train": [("train_1_0.png", "the storage tank on the left", "storage tank"),
              ("train_1_1.png", "two ships near the harbor", "ship")],
    "val": [("val_3_0.png", "the baseball diamond at the top", "baseball diamond")],
    "test": [("test_12_0.png", "the expressway service area in the middle", "expressway service area"),
             ("test_12_1.png", f"{CHINESE} vehicle", "vehicle")],
}


def make_risbench(root: Path, size=(32, 32)) -> dict[str, Expected]:
    rng = np.random.default_rng(1)
    folder, expected = root / "RISBench_dataset", {}
    for split, lines in RISBENCH_LINES.items():
        text = []
        for name, sentence, category in lines:
            image = _png(folder / "img_rgb" / name, random_image(rng, *size))
            mask = random_mask(rng, *size)
            _png(folder / "mask" / name, np.where(mask, 255, 0).astype(np.uint8))  # 8-bit, 0/255
            text.append(f"{name} {sentence}")
            expected[name[:-4]] = Expected(split, sentence, image, mask, category)
        (folder / f"output_phrase_{split}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    return expected


# ---------------------------------------------------------------------------------------------
# NWPU-Refer: image/image/*.jpg, new_refs(unc).p, new_instances.json (COCO, `category_id`)

NWPU_CATEGORIES = ["no target", "car", "ship", "photovolatic", "building"]


def make_nwpu(root: Path, size=(40, 48)) -> dict[str, Expected]:
    """Four images: a car (polygon) in train, a two-ship expression over two refs in val, a
    no-target expression and a Chinese one in test."""
    rng = np.random.default_rng(2)
    h, w = size
    images, anns, refs, expected = [], [], [], {}
    pixels = {i: _jpeg(root / "image" / "image" / f"{i:04d}.jpg", random_image(rng, h, w)) for i in (1, 2, 3, 4)}
    images = [{"id": i, "file_name": f"{i:04d}.jpg", "height": h, "width": w} for i in pixels]
    polygon = [[4.0, 4.0, 20.0, 4.0, 20.0, 16.0, 4.0, 16.0]]
    car = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, h, w))).astype(bool)
    ship_a, ship_b, building = (random_mask(rng, h, w) for _ in range(3))
    ship_b[:] = False
    ship_b[-5:, -6:] = True
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": polygon},
        {"id": 20, "image_id": 2, "category_id": 2, "segmentation": _rle(ship_a)},
        {"id": 21, "image_id": 2, "category_id": 2, "segmentation": [_rle(ship_b)]},
        {"id": 40, "image_id": 4, "category_id": 4, "segmentation": _rle(building)},
    ]

    def ref(ref_id, split, image_id, ann_id, category, *sentences):
        refs.append({"ref_id": ref_id, "split": split, "image_id": image_id, "ann_id": ann_id, "category_id": category,
                     "sentences": [{"raw": s, "sent": s.lower()} for s in sentences]})

    ref(1, "train", 1, 10, 1, "The car at the top left", "the small car")
    ref(2, "val", 2, 20, 2, "the two ships")
    ref(3, "val", 2, 21, 2, "the two ships")  # the same expression: one sample, the union
    ref(4, "test", 3, None, 0, "the airplane on the runway")  # no target
    ref(5, "test", 4, 40, 4, f"{CHINESE} building")
    expected["1_0"] = Expected("train", "The car at the top left", pixels[1], car, "car")
    expected["1_1"] = Expected("train", "the small car", pixels[1], car, "car")
    expected["2_0"] = Expected("val", "the two ships", pixels[2], ship_a | ship_b, "ship")
    expected["4_0"] = Expected("test", "the airplane on the runway", pixels[3], np.zeros((h, w), bool), "no target")
    expected["5_0"] = Expected("test", f"{CHINESE} building", pixels[4], building, "building")
    with (root / "new_refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    categories = [{"id": i, "name": n} for i, n in enumerate(NWPU_CATEGORIES)]
    (root / "new_instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return expected


# ---------------------------------------------------------------------------------------------
# RemoteSAM-270K: JPEGImages/, Annotations/, refs(unc).p, instances.json (segmentation: RLEs)


def make_remotesam(root: Path, size=(36, 40), refs_name: str = "refs(unc).p") -> dict[str, Expected]:
    """Splits train, val, testA, testB; a two-RLE union, a one-to-zero sample, an image listed as
    .jpg stored as .png, and a Chinese sentence."""
    rng = np.random.default_rng(3)
    h, w = size
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    plan = [  # image id, split, listed name, stored name, sentence, category
        (1, "train", "a.jpg", "a.jpg", "the red roof", 5),
        (2, "val", "b.jpg", "b.png", "the harbor crane", 7),  # listed .jpg, a .png on disk
        (3, "testA", "c.png", "c.png", "the tennis court on the right", 9),
        (4, "testB", "d.jpg", "d.jpg", f"{CHINESE} the road", 11),
        (5, "testB", "e.png", "e.jpg", "the white ship", 13),  # listed .png, a .jpg on disk
    ]
    images, anns, refs, expected = [], [], [], {}
    for image_id, split, listed, stored, sentence, category in plan:
        fmt = "PNG" if stored.endswith(".png") else "JPEG"
        pixels = _jpeg(root / "JPEGImages" / stored, random_image(rng, h, w), fmt)
        first, second = random_mask(rng, h, w), np.zeros((h, w), bool)
        second[:4, -4:] = True
        if image_id == 3:  # one-to-zero
            first[:] = False
            second[:] = False
        segmentation = [_rle(first), _rle(second)]
        images.append({"id": image_id, "file_name": listed, "height": h, "width": w})
        anns.append({"id": 100 + image_id, "image_id": image_id, "category_id": category, "segmentation": segmentation})
        refs.append({"ref_id": image_id, "split": split, "ann_id": 100 + image_id, "file_name": listed, "image_id": image_id,
                     "category_id": category, "sentences": [{"sent": sentence}]})
        expected[f"{image_id}_0"] = Expected(split, sentence, pixels, first | second, f"cat{category}")
    with (root / refs_name).open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    categories = [{"id": i, "name": f"cat{i}"} for i in range(297)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return expected


# ---------------------------------------------------------------------------------------------


def _decoded_image(row: dict) -> np.ndarray:
    """A row's image by the manifest's documented encoding: raw RGB, or the file's own bytes."""
    if row.get("encoding", "raw") == "raw":
        return np.frombuffer(row["image"], np.uint8).reshape(row["height"], row["width"], 3)
    with Image.open(io.BytesIO(row["image"])) as im:
        return np.asarray(im.convert("RGB"))


def _decoded_mask(row: dict) -> np.ndarray:
    packed = np.frombuffer(row["mask"], np.uint8).reshape(row["height"], -1)
    return np.unpackbits(packed, axis=1)[:, : row["width"]].astype(bool)


def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for shard_list in load_manifest(out)["shards"].values():
        for shard in shard_list:
            for row in pq.read_table(out / shard["path"]).to_pylist():
                rows[row["id"]] = row
    return rows


MAKERS = {"risbench": make_risbench, "nwpu-refer": make_nwpu, "remotesam": make_remotesam}


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_prepare_keeps_every_sample_with_its_source_mask(tmp_path, fmt):
    expected = MAKERS[fmt](tmp_path / "src")
    manifest = prepare_dataset(fmt, tmp_path / "src", tmp_path / "out", workers=2, keep_non_english=True)
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(expected)
    for sample_id, want in expected.items():
        row = rows[sample_id]
        assert (row["split"], row["phrase"], row["category"]) == (want.split, want.phrase, want.category), sample_id
        np.testing.assert_array_equal(_decoded_image(row), want.image, err_msg=sample_id)
        np.testing.assert_array_equal(_decoded_mask(row), want.mask, err_msg=sample_id)
    assert manifest["skipped"] == []
    assert any("1 expression(s) are not English" in w and "kept" in w for w in manifest["warnings"])
    assert set(manifest["counts"]) == {e.split for e in expected.values()}


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_non_english_left_out_by_default_and_counted(tmp_path, fmt):
    expected = MAKERS[fmt](tmp_path / "src")
    manifest = prepare_dataset(fmt, tmp_path / "src", tmp_path / "out", workers=2)
    chinese = {i for i, e in expected.items() if CHINESE in e.phrase}
    assert sorted(_rows(tmp_path / "out")) == sorted(set(expected) - chinese)
    assert any("1 expression(s) are not English" in w and "left out" in w for w in manifest["warnings"])


def test_keep_non_english_refused_for_other_formats(tmp_path):
    with pytest.raises(DatasetError, match="keep_non_english"):
        prepare_dataset("refsegrs", tmp_path, tmp_path / "out", keep_non_english=True)


def test_remotesam_default_refs_name_of_its_code(tmp_path):
    expected = make_remotesam(tmp_path, refs_name="refs(unc)_RemoteSAM.p")
    found = {t.id: t for t in read_remotesam(tmp_path, keep_non_english=True)}
    assert sorted(found) == sorted(expected)
    assert found["2_0"].image_path.endswith("b.png")


def test_risbench_bad_line_names_file_line_and_id(tmp_path):
    make_risbench(tmp_path)
    phrases = tmp_path / "RISBench_dataset" / "output_phrase_val.txt"
    phrases.write_text("val_3_0.png the baseball diamond\nval_9_0.png\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"output_phrase_val\.txt:2: id 'val_9_0' \(val\): line has a file name but no sentence"):
        list(read_risbench(tmp_path))


def test_nwpu_missing_annotation_names_ref_and_instances(tmp_path):
    make_nwpu(tmp_path)
    refs = pickle.loads((tmp_path / "new_refs(unc).p").read_bytes())
    refs[2]["ann_id"] = 999
    (tmp_path / "new_refs(unc).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(DatasetError, match=r"new_refs\(unc\)\.p\[1\]: id '2_0' \(val\): annotation 999 \(of ref 3, .*\) not in .*new_instances\.json"):
        list(read_nwpu_refer(tmp_path))


def test_remotesam_bad_rle_names_annotation_and_sample(tmp_path):
    make_remotesam(tmp_path)
    instances = json.loads((tmp_path / "instances.json").read_text())
    instances["annotations"][0]["segmentation"][1]["size"] = [99, 99]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(DatasetError, match=r"annotation 101 of .*instances\.json \(id '1_0'"):
        prepare_dataset("remotesam", tmp_path, tmp_path / "out", workers=1)


def test_risbench_masks_follow_the_mask_threshold(tmp_path):
    expected = make_risbench(tmp_path)
    mask = expected["val_3_0"].mask
    values = np.where(mask, 255, 0).astype(np.uint8)
    edge = np.zeros_like(mask)
    edge[-1, :20] = True  # a soft edge of 20 pixels at 100, outside the object
    edge &= ~mask
    values[edge] = 100
    Image.fromarray(values).save(tmp_path / "RISBench_dataset" / "mask" / "val_3_0.png")
    for threshold, want in ((50, mask | edge), (128, mask)):
        found = {t.id: t for t in read_risbench(tmp_path, mask_threshold=threshold, keep_non_english=True)}
        np.testing.assert_array_equal(found["val_3_0"].load_mask(), want, err_msg=str(threshold))
