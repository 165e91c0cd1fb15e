"""Each reader on generated fixtures in its exact published layout."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile

from rsrefseg.datasets.fiftyone import read_fiftyone
from rsrefseg.datasets.refsegrs import read_refsegrs
from rsrefseg.datasets.rrsisd import read_rrsisd
from rsrefseg.datasets.triplet import DatasetError

from .conftest import make_fiftyone, make_refsegrs, make_rrsisd, rrsisd_paths


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


@pytest.mark.parametrize("layout", ["download", "rrsisd", "flat"])
def test_rrsisd_reads_every_layout_and_segmentation_form_with_categories(tmp_path, layout):
    expected = make_rrsisd(tmp_path, layout=layout)
    given, _, _ = rrsisd_paths(tmp_path, layout)
    triplets = list(read_rrsisd(given))
    assert [t.id for t in triplets] == [f"{i}_0" for i in range(1, 8)]
    _check(triplets, expected)
    assert {t.id: t.category for t in triplets} == {k: e.category for k, e in expected.items()}
    assert triplets[0].category == "baseballfield" and triplets[-1].category == "windmill"
    poly = next(t for t in triplets if t.id == "5_0").load_mask()
    assert poly[12:24, 12:29].all() and not poly[:8].any()  # the rectangle polygon, rasterised


def test_rrsisd_several_sentences_give_several_samples(tmp_path):
    make_rrsisd(tmp_path)
    refs_path = tmp_path / "rrsisd" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[0]["sentences"].append({"tokens": ["the", "field"], "raw": "the field", "sent_id": 99, "sent": "the field"})
    refs_path.write_bytes(pickle.dumps(refs))
    triplets = [t for t in read_rrsisd(tmp_path) if t.id.startswith("1_")]
    assert [(t.id, t.phrase) for t in triplets] == [("1_0", "The baseball field on the top"), ("1_1", "the field")]
    np.testing.assert_array_equal(triplets[0].load_mask(), triplets[1].load_mask())


def test_rrsisd_not_a_dataset_names_the_expected_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"no refs\(unc\)\.p in .* or .*rrsisd .*images/rrsisd/JPEGImages"):
        list(read_rrsisd(tmp_path))
    make_rrsisd(tmp_path)
    (tmp_path / "images" / "rrsisd" / "JPEGImages").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match=r"images not found: none of .*images/rrsisd/JPEGImages"):
        list(read_rrsisd(tmp_path))


def test_rrsisd_undecodable_mask_names_annotation_and_id_never_the_whole_rle(tmp_path):
    make_rrsisd(tmp_path)
    path = tmp_path / "rrsisd" / "instances.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segmentation"] = [{"size": [40, 48], "counts": "x" * 5000}]
    data["annotations"][2]["segmentation"] = "a string"
    path.write_text(json.dumps(data))
    triplets = {t.id: t for t in read_rrsisd(tmp_path)}
    for sample_id, needle in (("2_0", "cannot be decoded"), ("3_0", "unsupported segmentation: str")):
        with pytest.raises(DatasetError) as info:
            triplets[sample_id].load_mask()
        message = str(info.value)
        assert needle in message and f"annotation {sample_id[0]}" in message and f"id '{sample_id}'" in message
        assert "instances.json" in message and len(message) < 600, message


def test_rrsisd_refuses_pickles_that_hold_code(tmp_path):
    make_rrsisd(tmp_path)
    (tmp_path / "rrsisd" / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "x": np.float64(1.0)}]))
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p.*refusing to load numpy"):
        list(read_rrsisd(tmp_path))


def test_rrsisd_missing_annotation_is_reported_with_ref(tmp_path):
    make_rrsisd(tmp_path)
    path = tmp_path / "rrsisd" / "instances.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 2]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"id '2_0'.*annotation 2 not in"):
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


@pytest.mark.parametrize("edges", ["soft", "noisy"])
def test_refsegrs_masks_with_soft_or_noisy_edges_binarize_to_the_hard_mask(tmp_path, edges):
    expected = make_refsegrs(tmp_path, size=(48, 64), edges=edges, repeat_mask=False)
    _check(list(read_refsegrs(tmp_path)), expected)


def test_mask_threshold_moves_the_soft_rim(tmp_path):
    expected = make_refsegrs(tmp_path, size=(48, 64), edges="soft", counts=(("train", 1), ("val", 1), ("test", 1)))
    mask = next(read_refsegrs(tmp_path, mask_threshold=1)).load_mask()
    # `> 0` (RSRefSeg-2's rule) takes the outer rim too: the mask grows by one pixel all round
    assert mask.sum() > expected["0"].mask.sum() and (mask | expected["0"].mask).sum() == mask.sum()


NOT_MASKS = {
    # name: (pixels of the mask file, substrings of the error)
    "a photo": (lambda m: np.random.default_rng(1).integers(0, 256, m.shape, dtype=np.uint8), ["not a binary mask", "between 64 and 191"]),
    "class indices": (lambda m: (m * 2 + np.eye(*m.shape, dtype=np.uint8)).astype(np.uint8), ["never reach the foreground threshold 128", "0, 1, 2, 3"]),
    "different channels": (lambda m: np.stack([m * 255, m * 0, m * 255], axis=2).astype(np.uint8), ["3 different channels"]),
    "16-bit levels": (lambda m: m.astype(np.uint16) * 1000, ["expected 8-bit values or 0/1", "uint16"]),
}


@pytest.mark.parametrize("case", sorted(NOT_MASKS))
def test_a_file_that_is_not_a_mask_is_refused_with_its_name(tmp_path, case):
    make_, needles = NOT_MASKS[case]
    expected = make_refsegrs(tmp_path, size=(48, 64), counts=(("train", 1), ("val", 1), ("test", 1)))
    tifffile.imwrite(tmp_path / "masks" / "2.tif", make_(expected["2"].mask.astype(np.uint8)))
    triplet = [t for t in read_refsegrs(tmp_path) if t.id == "2"][0]
    with pytest.raises(DatasetError) as info:
        triplet.load_mask()
    for needle in [*needles, "masks/2.tif", "id '2'"]:
        assert needle in str(info.value), str(info.value)


def test_fiftyone_category_from_a_label_field_else_from_the_phrase(tmp_path):
    make_fiftyone(tmp_path)
    data = json.loads((tmp_path / "samples.json").read_text())
    data["samples"][0]["category"] = {"_cls": "Classification", "label": "impervious surface"}
    data["samples"][1]["phrase"] = "vehicles in the parking area"
    (tmp_path / "samples.json").write_text(json.dumps(data))
    categories = {t.id: t.category for t in read_fiftyone(tmp_path)}
    assert categories["1"] == "impervious surface" and categories["2"] == "vehicle"
