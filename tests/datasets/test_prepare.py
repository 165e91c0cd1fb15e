"""prepare_dataset: validation, Parquet shards, manifest, determinism, atomic output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from rsrefseg.datasets.prepare import load_manifest, prepare_dataset
from rsrefseg.datasets.triplet import DatasetError

from .conftest import make_fiftyone, make_refsegrs, make_rrsisd

MAKERS = {"refsegrs": make_refsegrs, "rrsisd": make_rrsisd, "fiftyone": make_fiftyone}


def pixels(row: dict) -> np.ndarray:
    """A row's image, decoded by the manifest's documented encoding (not by our own reader):
    a JPEG or PNG file's bytes as shipped, else raw pixels."""
    if row["encoding"] in ("jpeg", "png"):
        with Image.open(io.BytesIO(row["image"])) as im:
            assert im.format.lower() == row["encoding"]
            return np.asarray(im)
    assert row["encoding"] == "raw"
    return np.frombuffer(row["image"], np.uint8).reshape(row["height"], row["width"], 3)


def mask_of(row: dict) -> np.ndarray:
    """A row's mask: rows of bits, MSB first, each padded to a whole byte."""
    packed = np.frombuffer(row["mask"], np.uint8).reshape(row["height"], -1)
    return np.unpackbits(packed, axis=1)[:, : row["width"]].astype(bool)


def read_rows(out: Path) -> dict[str, dict]:
    rows = {}
    for shard_list in load_manifest(out)["shards"].values():
        for shard in shard_list:
            for row in pq.read_table(out / shard["path"]).to_pylist():
                assert row["id"] not in rows
                rows[row["id"]] = row
    return rows


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_prepare_round_trips_ids_phrases_and_pixels(tmp_path, fmt):
    expected = MAKERS[fmt](tmp_path / "src")
    manifest = prepare_dataset(fmt, tmp_path / "src", tmp_path / "out", rows_per_shard=2)
    counts = {s: sum(e.split == s for e in expected.values()) for s in ("train", "val", "test")}
    assert manifest["counts"] == counts
    assert manifest["skipped"] == [] and manifest["warnings"] == []
    rows = read_rows(tmp_path / "out")
    assert sorted(rows) == sorted(expected)
    for sample_id, row in rows.items():
        exp = expected[sample_id]
        assert (row["split"], row["phrase"]) == (exp.split, exp.phrase)
        assert (row["height"], row["width"]) == exp.mask.shape
        np.testing.assert_array_equal(pixels(row), exp.image)
        np.testing.assert_array_equal(mask_of(row), exp.mask)


def test_shards_are_bounded_sorted_by_id_and_indexed(tmp_path):
    make_refsegrs(tmp_path / "src", counts=(("train", 12), ("val", 1), ("test", 1)))
    manifest = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "out", rows_per_shard=5)
    shards = manifest["shards"]["train"]
    version = shards[0]["path"].split("/")[0]  # the version prefix this prepare wrote under
    assert [s["path"] for s in shards] == [f"{version}/train/part-0000{i}.parquet" for i in range(3)]
    assert [s["rows"] for s in shards] == [5, 5, 2]
    table = pq.read_table([tmp_path / "out" / s["path"] for s in shards][0])
    assert table.schema.names == ["id", "phrase", "split", "category", "image", "mask", "height", "width", "index", "encoding"]
    ids = [r["id"] for s in shards for r in pq.read_table(tmp_path / "out" / s["path"]).to_pylist()]
    assert ids == [str(i) for i in range(12)]  # natural order: "2" before "10"
    indices = [r["index"] for s in shards for r in pq.read_table(tmp_path / "out" / s["path"]).to_pylist()]
    assert indices == list(range(12))


def test_same_input_gives_the_same_hash_and_different_input_a_different_one(tmp_path):
    make_refsegrs(tmp_path / "src")
    first = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "a")
    second = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "b", workers=1, rows_per_shard=3)
    assert first["content_hash"] == second["content_hash"]
    # byte-identical shards with the same settings
    third = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "a")
    assert third["content_hash"] == first["content_hash"]
    # one mask pixel changes the hash
    mask = tifffile.imread(tmp_path / "src" / "masks" / "3.tif")
    mask[0, 0] = 255 - mask[0, 0]
    tifffile.imwrite(tmp_path / "src" / "masks" / "3.tif", mask)
    assert prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "c")["content_hash"] != first["content_hash"]


def test_rerun_writes_identical_shards(tmp_path):
    make_refsegrs(tmp_path / "src")
    a = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "a")
    b = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "b")
    assert a["shards"].keys() == b["shards"].keys()
    for split in a["shards"]:
        assert len(a["shards"][split]) == len(b["shards"][split])
        for sa, sb in zip(a["shards"][split], b["shards"][split]):
            assert (tmp_path / "a" / sa["path"]).read_bytes() == (tmp_path / "b" / sb["path"]).read_bytes()


# --------------------------------------------------------------------------------------------
# Bad inputs: each gives a clear error naming what is wrong, and skip_invalid records it.


def _rewrite_line(root: Path, split: str, lineno: int, data: bytes) -> None:
    path = root / f"output_phrase_{split}.txt"
    lines = path.read_bytes().splitlines()
    lines[lineno - 1] = data
    path.write_bytes(b"\n".join(lines) + b"\n")


def _append_line(root: Path, split: str, data: bytes) -> None:
    with (root / f"output_phrase_{split}.txt").open("ab") as f:
        f.write(data + b"\n")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _mask_values(root: Path) -> None:
    mask = tifffile.imread(root / "masks" / "3.tif")
    mask[:12] = 100  # a grey band over half the mask: not a mask any policy should guess at
    tifffile.imwrite(root / "masks" / "3.tif", mask)


BAD_INPUTS = {
    # name: (break the source, substrings of the error, skipped id (None: a split-level warning))
    "missing image": (lambda r: (r / "images" / "3.tif").unlink(), ["image file missing", "3.tif", "id '3'", "output_phrase_train.txt:4"], "3"),
    "missing mask": (lambda r: (r / "masks" / "8.tif").unlink(), ["mask file missing", "masks/8.tif", "id '8'"], "8"),
    "truncated image": (lambda r: _truncate(r / "images" / "4.tif"), ["unreadable or truncated", "images/4.tif", "id '4'"], "4"),
    "garbage mask": (lambda r: (r / "masks" / "2.tif").write_bytes(b"not a tiff at all"), ["unreadable or truncated", "masks/2.tif", "id '2'"], "2"),
    "size mismatch": (
        lambda r: tifffile.imwrite(r / "masks" / "6.tif", np.zeros((10, 10), np.uint8)),
        ["id '6'", "is 32x24 but mask", "is 10x10"],
        "6",
    ),
    "non-binary mask": (_mask_values, ["masks/3.tif", "id '3'", "not a binary mask", "between 64 and 191", "values 0, 100"], "3"),
    "line without phrase": (lambda r: _rewrite_line(r, "val", 1, b"5"), ["output_phrase_val.txt:1", "id '5'", "no phrase"], "5"),
    "duplicate id": (lambda r: _append_line(r, "train", b"2 another phrase"), ["output_phrase_train.txt:6", "id '2'", "duplicate id", "first declared at", "output_phrase_train.txt:3"], "2"),
    "id in two splits": (lambda r: _append_line(r, "test", b"1 a leaked phrase"), ["id '1'", "also in split(s) test", "output_phrase_test.txt:4"], "1"),
    "non-UTF-8 line": (lambda r: _rewrite_line(r, "test", 2, b"8 caf\xe9 vehicle"), ["output_phrase_test.txt:2", "not valid UTF-8", "id '8'"], "8"),
    "empty split": (lambda r: (r / "output_phrase_val.txt").write_bytes(b"\n"), ["split 'val' is empty", "output_phrase_val.txt"], None),
    "image not 8-bit": (lambda r: tifffile.imwrite(r / "images" / "7.tif", np.zeros((24, 32, 3), np.uint16)), ["images/7.tif", "id '7'", "expected 8-bit"], "7"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_a_clear_error_and_writes_nothing(tmp_path, case):
    breaker, needles, _ = BAD_INPUTS[case]
    src, out = tmp_path / "src", tmp_path / "out"
    make_refsegrs(src, repeat_mask=False)
    breaker(src)
    with pytest.raises(DatasetError) as info:
        prepare_dataset("refsegrs", src, out)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert "nothing was written" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no staging left behind


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_skip_invalid_leaves_the_sample_out_and_records_why(tmp_path, case):
    breaker, needles, skipped_id = BAD_INPUTS[case]
    src, out = tmp_path / "src", tmp_path / "out"
    expected = make_refsegrs(src, repeat_mask=False)
    breaker(src)
    if skipped_id is None:  # an empty split is never a success, skipping or not
        with pytest.raises(DatasetError, match=needles[0]):
            prepare_dataset("refsegrs", src, out, skip_invalid=True)
        assert not out.exists()
        return
    manifest = prepare_dataset("refsegrs", src, out, skip_invalid=True)
    assert load_manifest(out) == manifest
    rows = read_rows(out)
    records = [s for s in manifest["skipped"] if s["id"] == skipped_id]
    assert records, manifest["skipped"]
    text = "\n".join(f"{r['where']}: id '{r['id']}' ({r['split']}): {r['reason']}" for r in records)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    # the bad occurrence is gone; for a duplicate, the first occurrence stays
    if case == "duplicate id":
        assert rows["2"]["phrase"] == expected["2"].phrase
    else:
        assert skipped_id not in rows
    assert sum(manifest["counts"].values()) == len(rows)


def test_errors_list_every_problem_at_once(tmp_path):
    make_refsegrs(tmp_path / "src", repeat_mask=False)
    (tmp_path / "src" / "images" / "1.tif").unlink()
    (tmp_path / "src" / "masks" / "9.tif").unlink()
    with pytest.raises(DatasetError, match=r"(?s)2 problem\(s\).*id '1'.*id '9'"):
        prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "out")


# --------------------------------------------------------------------------------------------
# The output folder


def test_output_replaces_a_previous_prepared_dataset_but_nothing_else(tmp_path):
    make_refsegrs(tmp_path / "src")
    out = tmp_path / "out"
    first = prepare_dataset("refsegrs", tmp_path / "src", out)
    version = first["shards"]["train"][0]["path"].split("/")[0]
    (out / version / "train" / "stale.parquet").write_bytes(b"old")
    prepare_dataset("refsegrs", tmp_path / "src", out)  # the old version replaced as a whole
    assert not (out / version).exists()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match=r"refusing to write to .*notes.*not a prepared dataset \(no manifest.json\)"):
        prepare_dataset("refsegrs", tmp_path / "src", other)
    assert (other / "thesis.tex").read_text() == "precious"


def test_a_failure_while_writing_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
    make_refsegrs(tmp_path / "src")
    out = tmp_path / "out"
    before = prepare_dataset("refsegrs", tmp_path / "src", out)

    import rsrefseg.datasets.prepare as prepare_module

    calls = {"n": 0}
    real = prepare_module.encode_image

    def failing(array):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full")
        return real(array)

    monkeypatch.setattr(prepare_module, "encode_image", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset("refsegrs", tmp_path / "src", out)
    assert load_manifest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # staging removed


def test_load_manifest_of_a_folder_that_is_not_prepared(tmp_path):
    with pytest.raises(DatasetError, match=r"not a prepared dataset: .*manifest\.json is missing.*rsrefseg prepare"):
        load_manifest(tmp_path)


def test_manifest_records_format_source_and_schema(tmp_path):
    expected = make_refsegrs(tmp_path / "src")
    manifest = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["schema_version"] == 3 and manifest["format"] == "refsegrs"
    assert manifest["source"] == str((tmp_path / "src").resolve())
    assert len(manifest["content_hash"]) == 64
    assert manifest["largest_image"] == {split: list(next(iter(expected.values())).mask.shape) for split in ("train", "val", "test")}
    # the pixel columns are compressed by Parquet (the pixels themselves are raw)
    shard = pq.ParquetFile(tmp_path / "out" / manifest["shards"]["train"][0]["path"])
    columns = {c.path_in_schema: c.compression for c in (shard.metadata.row_group(0).column(i) for i in range(shard.metadata.num_columns))}
    assert columns["image"] == columns["mask"] == manifest["encoding"]["compression"].upper()


def test_a_dataset_prepared_by_an_older_version_asks_to_prepare_again(tmp_path):
    make_refsegrs(tmp_path / "src")
    prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    with pytest.raises(DatasetError, match=r"schema_version 2 is not 3; run `rsrefseg prepare` again"):
        load_manifest(tmp_path / "out")


def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetError, match="refsegrs, synthetic, rrsisd, fiftyone"):
        prepare_dataset("coco", tmp_path, tmp_path / "out")


def test_cli_prepare_fails_clearly_then_skips_with_skip_invalid(tmp_path, capsys):
    from rsrefseg.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    make_refsegrs(src, repeat_mask=False)
    (src / "masks" / "8.tif").unlink()
    args = ["prepare", "--format", "refsegrs", "--root", str(src), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "mask file missing" in err and "masks/8.tif" in err and "output_phrase_test.txt:2" in err
    assert "--skip-invalid" in err  # the way out, as a CLI user types it
    assert not out.exists()
    assert main([*args, "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 invalid triplet(s)" in printed and "id '8' (test): mask file missing" in printed
    assert [s["id"] for s in load_manifest(out)["skipped"]] == ["8"]


def test_cli_demo_data_then_prepare(tmp_path, capsys):
    from rsrefseg.cli import main

    assert main(["demo-data", "--out", str(tmp_path / "raw"), "--size", "12", "--seed", "3"]) == 0
    assert "wrote 12 synthetic triplets" in capsys.readouterr().out
    assert main(["prepare", "--format", "synthetic", "--root", str(tmp_path / "raw"),
                 "--out", str(tmp_path / "prepared")]) == 0
    assert "[rsrefseg] prepared" in capsys.readouterr().out
    assert sum(load_manifest(tmp_path / "prepared")["counts"].values()) == 12


# --------------------------------------------------------------------------------------------
# The datasets as they ship


def test_rrsisd_as_downloaded_prepares_with_no_flags_and_keeps_every_sample(tmp_path, capsys):
    from rsrefseg.cli import main

    expected = make_rrsisd(tmp_path / "RRSIS-D", odd_sized=True)
    out = tmp_path / "out"
    assert main(["prepare", "--format", "rrsisd", "--root", str(tmp_path / "RRSIS-D"), "--out", str(out)]) == 0
    manifest = load_manifest(out)
    rows = read_rows(out)
    assert sorted(rows) == sorted(expected) and manifest["skipped"] == []
    for sample_id, exp in expected.items():
        row = rows[sample_id]
        assert (row["split"], row["phrase"], row["category"]) == (exp.split, exp.phrase, exp.category)
        np.testing.assert_array_equal(pixels(row), exp.image, err_msg=sample_id)
        np.testing.assert_array_equal(mask_of(row), exp.mask, err_msg=sample_id)
    # the odd-sized JPEG is kept, its mask fitted, and both the manifest and the terminal say so
    assert (rows["4_0"]["height"], rows["4_0"]["width"]) == (34, 38)
    assert len(manifest["warnings"]) == 1 and "id '4_0'" in manifest["warnings"][0]
    assert "is 38x34 but mask" in manifest["warnings"][0] and "resized to the image" in manifest["warnings"][0]
    printed = capsys.readouterr().out
    assert "kept 1 sample(s) with a change" in printed and "id '4_0'" in printed
    # categories per split, counted from the fixture's own truth
    for split in ("train", "val", "test"):
        truth: dict[str, int] = {}
        for exp in expected.values():
            if exp.split == split:
                truth[exp.category] = truth.get(exp.category, 0) + 1
        assert manifest["categories"][split] == truth
    assert "test by category: airplane 1, ship 1, windmill 1" in printed


def test_rrsisd_missing_image_names_the_file_or_is_skipped(tmp_path):
    expected = make_rrsisd(tmp_path / "src", missing_image=True)
    with pytest.raises(DatasetError, match=r"image file missing: .*images/rrsisd/JPEGImages/00006\.jpg .*id '6_0'"):
        prepare_dataset("rrsisd", tmp_path / "src", tmp_path / "out")
    manifest = prepare_dataset("rrsisd", tmp_path / "src", tmp_path / "out", skip_invalid=True)
    assert [s["id"] for s in manifest["skipped"]] == ["6_0"]
    assert sorted(read_rows(tmp_path / "out")) == sorted(expected)


def test_skipping_that_empties_a_split_fails_and_says_why(tmp_path):
    make_rrsisd(tmp_path / "src")
    (tmp_path / "src" / "images" / "rrsisd" / "JPEGImages" / "00004.jpg").unlink()  # the only val image
    with pytest.raises(DatasetError) as info:
        prepare_dataset("rrsisd", tmp_path / "src", tmp_path / "out", skip_invalid=True)
    message = str(info.value)
    assert message.index("split 'val' is empty") < message.index("00004.jpg")  # the reason first
    assert "would leave a split empty" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edges", ["soft", "noisy"])
def test_refsegrs_copies_with_soft_or_noisy_masks_prepare_to_the_source_masks(tmp_path, edges):
    expected = make_refsegrs(tmp_path / "src", size=(48, 64), edges=edges)
    manifest = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "out")
    assert manifest["skipped"] == [] and manifest["mask_threshold"] == 128
    for sample_id, row in read_rows(tmp_path / "out").items():
        np.testing.assert_array_equal(mask_of(row), expected[sample_id].mask, err_msg=sample_id)


def test_mask_threshold_out_of_range_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="mask threshold must be within 1..255"):
        prepare_dataset("refsegrs", tmp_path, tmp_path / "out", mask_threshold=0)


def test_synthetic_categories_are_the_generators(prepared_synthetic):
    from rsrefseg.datasets.synthetic import PHRASES

    rows = read_rows(prepared_synthetic)
    assert all(row["category"] == PHRASES[row["phrase"]].family for row in rows.values())
    categories = load_manifest(prepared_synthetic)["categories"]
    assert sum(sum(per.values()) for per in categories.values()) == len(rows)
    assert len(categories["train"]) >= 4  # the demo learns several categories, not two


def test_prepare_and_demo_data_do_not_import_ray_or_torch(tmp_path):
    """Light commands stay light: a fresh interpreter runs them without importing Ray or torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rsrefseg.cli import main\n"
        f"assert main(['demo-data', '--out', {str(tmp_path / 'raw')!r}, '--size', '6']) == 0\n"
        f"assert main(['prepare', '--format', 'synthetic', '--root', {str(tmp_path / 'raw')!r}, '--out', {str(tmp_path / 'out')!r}]) == 0\n"
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_refsegrs_categories_come_from_the_phrase_rule_and_are_counted(tmp_path):
    make_refsegrs(tmp_path / "src", counts=(("train", 3), ("val", 1), ("test", 1)), repeat_mask=False)
    phrases = {"train": ["vehicle in the parking area", "building along the road", "white cars"],
               "val": ["low vegetation"], "test": ["the river bank"]}
    ids = iter(range(5))
    for split, lines in phrases.items():
        (tmp_path / "src" / f"output_phrase_{split}.txt").write_text("".join(f"{next(ids)} {p}\n" for p in lines))
    manifest = prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert {r["phrase"]: r["category"] for r in rows.values()} == {
        "vehicle in the parking area": "vehicle", "building along the road": "building", "white cars": "car",
        "low vegetation": "low vegetation", "the river bank": "other"}
    assert manifest["categories"] == {"train": {"vehicle": 1, "building": 1, "car": 1},
                                      "val": {"low vegetation": 1}, "test": {"other": 1}}


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_split_empty_in_the_source_does_not_suggest_skipping(tmp_path, skip_invalid):
    make_refsegrs(tmp_path / "src")
    (tmp_path / "src" / "output_phrase_val.txt").write_text("")
    with pytest.raises(DatasetError) as info:
        prepare_dataset("refsegrs", tmp_path / "src", tmp_path / "out", skip_invalid=skip_invalid)
    message = str(info.value)
    assert "val" in message and "needs samples in every split" in message
    assert "--skip-invalid" not in message and "Skipping" not in message


def test_a_pixel_row_of_the_wrong_length_names_the_sample():
    import pyarrow as pa

    from rsrefseg.datasets.shard_codec import pixel_rows

    column = pa.array([bytes(2 * 3 * 3), bytes(2 * 3 * 3 - 1)], pa.binary())  # the second lost a byte
    with pytest.raises(DatasetError, match=r"image of '7': 17 bytes where \(2, 3, 3\) needs 18.*rsrefseg prepare"):
        pixel_rows(column, [(2, 3, 3), (2, 3, 3)], ["image of '6'", "image of '7'"])
    rows = pixel_rows(column.slice(0, 1), [(2, 3, 3)], ["image of '6'"])
    assert rows.shape == (1, 2, 3, 3) and not rows.any()
