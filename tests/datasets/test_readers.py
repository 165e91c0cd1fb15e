"""Each reader on generated fixtures in its exact published layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from rsrefseg.datasets.fiftyone import read_fiftyone
from rsrefseg.datasets.refsegrs import read_refsegrs
from rsrefseg.datasets.rrsisd import read_rrsisd
from rsrefseg.datasets.triplet import DatasetError

from .conftest import make_fiftyone, make_refsegrs, make_rrsisd


def _check(triplets, expected):
    got = {t.id: t for t in triplets}
    assert sorted(got) == sorted(expected)
    for sample_id, exp in expected.items():
        t = got[sample_id]
        assert (t.split, t.phrase) == (exp.split, exp.phrase), sample_id
        image, mask = t.load_image(), t.load_mask()
        assert image.dtype == np.uint8 and image.shape == exp.image.shape
        np.testing.assert_array_equal(image, exp.image, err_msg=sample_id)
        assert mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, exp.mask, err_msg=sample_id)


@pytest.mark.parametrize("mask_scale", [1, 255])
def test_refsegrs_reads_every_line_with_binary_masks(tmp_path, mask_scale):
    expected = make_refsegrs(tmp_path, mask_scale=mask_scale)
    triplets = list(read_refsegrs(tmp_path))
    _check(triplets, expected)
    # file order, split by split
    assert [t.split for t in triplets] == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    # the same mask under two ids (RefSegRS reuses masks with different phrases)
    by_id = {t.id: t for t in triplets}
    np.testing.assert_array_equal(by_id["0"].load_mask(), by_id["1"].load_mask())


def test_refsegrs_splits_on_the_first_space_only(tmp_path):
    make_refsegrs(tmp_path)
    (tmp_path / "output_phrase_val.txt").write_text("5   vehicle  in the parking area  \r\n\n6 road\n", encoding="utf-8")
    phrases = {t.id: t.phrase for t in read_refsegrs(tmp_path) if t.split == "val"}
    assert phrases == {"5": "vehicle  in the parking area", "6": "road"}


def test_refsegrs_pixels_are_loaded_lazily(tmp_path):
    make_refsegrs(tmp_path)
    for f in (tmp_path / "images").iterdir():
        f.unlink()
    triplets = list(read_refsegrs(tmp_path))  # metadata only: no error yet
    assert len(triplets) == 10
    with pytest.raises(DatasetError, match=r"image file missing: .*0\.tif .*id '0'.*output_phrase_train\.txt:1"):
        triplets[0].load_image()


def test_refsegrs_missing_phrase_file_is_named(tmp_path):
    make_refsegrs(tmp_path)
    (tmp_path / "output_phrase_test.txt").unlink()
    with pytest.raises(DatasetError, match="output_phrase_test.txt"):
        list(read_refsegrs(tmp_path))


def test_rrsisd_one_triplet_per_sentence_and_every_rle_kind(tmp_path):
    expected = make_rrsisd(tmp_path)
    triplets = list(read_rrsisd(tmp_path))
    # 100_0 compressed RLE, 101_0 uncompressed RLE, 102_0 polygons; 100 has two sentences
    assert [t.id for t in triplets] == ["100_0", "100_1", "101_0", "102_0", "103_0"]
    _check(triplets, expected)
    poly = next(t for t in triplets if t.id == "102_0").load_mask()
    assert poly[12:24, 12:29].all() and not poly[:8].any()  # the rectangle polygon, rasterised


def test_rrsisd_images_under_the_rmsin_folder_are_found(tmp_path):
    expected = make_rrsisd(tmp_path)
    (tmp_path / "images" / "rrsisd").mkdir(parents=True)
    (tmp_path / "JPEGImages").rename(tmp_path / "images" / "rrsisd" / "JPEGImages")
    _check(list(read_rrsisd(tmp_path)), expected)


def test_rrsisd_refuses_pickles_that_hold_code(tmp_path):
    make_rrsisd(tmp_path)
    import pickle

    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "x": np.float64(1.0)}]))
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p.*refusing to load numpy"):
        list(read_rrsisd(tmp_path))


def test_rrsisd_missing_annotation_is_reported_with_ref(tmp_path):
    make_rrsisd(tmp_path)
    data = json.loads((tmp_path / "instances.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 12]
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"id '101_0'.*annotation 12 not in"):
        list(read_rrsisd(tmp_path))


def test_fiftyone_export_split_from_tags_or_field_masks_from_files_or_inline(tmp_path):
    expected = make_fiftyone(tmp_path)
    triplets = list(read_fiftyone(tmp_path))
    _check(triplets, expected)
    assert {t.id: t.split for t in triplets} == {"1": "train", "2": "train", "3": "val", "4": "test", "5": "test"}


def test_fiftyone_phrase_may_be_a_classification_and_field_names_vary(tmp_path):
    make_fiftyone(tmp_path)
    data = json.loads((tmp_path / "samples.json").read_text())
    for s in data["samples"]:
        s["referring_expression"] = {"_cls": "Classification", "label": s.pop("phrase")}
        s["ground_truth"] = s.pop("segmentation")
    (tmp_path / "samples.json").write_text(json.dumps(data))
    triplets = list(read_fiftyone(tmp_path))
    assert len(triplets) == 5 and all(t.phrase for t in triplets)


def test_fiftyone_sample_without_split_is_reported(tmp_path):
    make_fiftyone(tmp_path)
    data = json.loads((tmp_path / "samples.json").read_text())
    data["samples"][0]["tags"] = ["reviewed"]
    (tmp_path / "samples.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"samples\.json\[samples\]\[0\].*id '1'.*no split"):
        list(read_fiftyone(tmp_path))


def test_fiftyone_without_samples_json_says_what_is_expected(tmp_path):
    with pytest.raises(DatasetError, match="samples.json is missing"):
        list(read_fiftyone(tmp_path))


def test_tiff_masks_may_be_bool_or_identical_rgb_channels(tmp_path):
    expected = make_refsegrs(tmp_path, counts=(("train", 1), ("val", 1), ("test", 1)), repeat_mask=False)
    tifffile.imwrite(tmp_path / "masks" / "0.tif", np.repeat(expected["0"].mask[..., None].astype(np.uint8) * 255, 3, 2), photometric="rgb")
    tifffile.imwrite(tmp_path / "masks" / "1.tif", expected["1"].mask)  # 1-bit
    _check(list(read_refsegrs(tmp_path)), expected)
