"""Names read from a dataset never become paths: a split names a folder of the prepared dataset,
so a split that climbs, is absolute or nests is refused (naming the file, the sample and the name)
and nothing is written anywhere, with or without --skip-invalid."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from rsrefseg.datasets.prepare import prepare_dataset
from rsrefseg.datasets.triplet import DatasetError, check_split_name

from .conftest import make_fiftyone, make_refsegrs, make_rrsisd


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _outside(root: Path, out: Path) -> set[str]:
    """The tree of `root` less what lies in `out` (prepare may keep a lock file there)."""
    inside = str(out.relative_to(root))
    return {p for p in _tree(root) if p != inside and not p.startswith(inside + "/")}


def _bad_names(tmp_path: Path) -> list[str]:
    # An absolute name inside tmp_path (never the real /abs): on the old code it wrote there.
    return ["../evil", "../../evil", str(tmp_path / "abs"), "a/b", "..", "."]


@pytest.mark.parametrize("name", ["train", "val", "test", "testA", "testB", "val_2", "fold-1", "A" * 64])
def test_plain_split_names_pass(name):
    assert check_split_name(name, where="f") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../evil", "/abs", "a/b", "a\\b", "-x", "_x", "tr ain", "train\n",
                                  "A" * 65, "tést", None, 3])
def test_unsafe_split_names_are_refused_naming_where_id_and_name(name):
    with pytest.raises(DatasetError) as info:
        check_split_name(name, where="refs(unc).p[4]", id="7_0")
    message = str(info.value)
    assert "refs(unc).p[4]" in message and "'7_0'" in message and repr(name) in message


@pytest.mark.parametrize("skip_invalid", [False, True])
@pytest.mark.parametrize("bad", range(6))
def test_rrsisd_split_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, bad, skip_invalid):
    name = _bad_names(tmp_path)[bad]
    make_rrsisd(tmp_path / "RRSIS-D")
    refs_path = tmp_path / "RRSIS-D" / "rrsisd" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[1]["split"] = name  # train keeps refs 1 and 3: only the bad name can fail the prepare
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    out = tmp_path / "out"
    before = _tree(tmp_path)

    with pytest.raises(DatasetError) as info:
        prepare_dataset("rrsisd", tmp_path / "RRSIS-D", out, skip_invalid=skip_invalid, workers=1)

    message = str(info.value)
    assert "refs(unc).p[1]" in message and "id '2_0'" in message and repr(name) in message, message
    assert _outside(tmp_path, out) == before  # nothing written (or removed) outside --out
    assert not list(out.rglob("*.parquet"))


@pytest.mark.parametrize("bad", range(6))
def test_fiftyone_split_field_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, bad):
    name = _bad_names(tmp_path)[bad]
    make_fiftyone(tmp_path / "fo")
    samples_path = tmp_path / "fo" / "samples.json"
    data = json.loads(samples_path.read_text())
    data["samples"][1]["split"] = name  # tagged train too: only the field can fail the prepare
    samples_path.write_text(json.dumps(data))
    out = tmp_path / "out"
    before = _tree(tmp_path)

    with pytest.raises(DatasetError) as info:
        prepare_dataset("fiftyone", tmp_path / "fo", out, skip_invalid=True, workers=1)

    message = str(info.value)
    assert "samples.json[samples][1]" in message and "id '2'" in message and repr(name) in message, message
    assert _outside(tmp_path, out) == before


def test_fiftyone_tags_are_free_labels_not_split_names(tmp_path):
    # A tag that is not a split name is just a label: the sample keeps its split tag.
    make_fiftyone(tmp_path / "fo")
    samples_path = tmp_path / "fo" / "samples.json"
    data = json.loads(samples_path.read_text())
    data["samples"][0]["tags"].append("../evil")
    samples_path.write_text(json.dumps(data))
    manifest = prepare_dataset("fiftyone", tmp_path / "fo", tmp_path / "out", workers=1)
    assert manifest["counts"] == {"train": 2, "val": 1, "test": 2}


def test_refsegrs_id_that_is_a_path_is_skipped_never_read(tmp_path):
    # An id names images/<id>.tif and masks/<id>.tif: an id with a separator would read any file.
    make_refsegrs(tmp_path / "rs")
    secret = tmp_path / "secret"
    make_refsegrs(secret)  # a valid image elsewhere, which the climbing id points at
    phrases = tmp_path / "rs" / "output_phrase_train.txt"
    phrases.write_text(phrases.read_text() + "../../secret/images/0 the stolen image\n", encoding="utf-8")

    with pytest.raises(DatasetError, match=r"output_phrase_train\.txt:6: id '\.\./\.\./secret/images/0'.*not a plain file name"):
        prepare_dataset("refsegrs", tmp_path / "rs", tmp_path / "out", workers=1)
    manifest = prepare_dataset("refsegrs", tmp_path / "rs", tmp_path / "out", skip_invalid=True, workers=1)
    assert manifest["counts"]["train"] == 5 and [s["id"] for s in manifest["skipped"]] == ["../../secret/images/0"]


def test_rrsisd_file_name_that_is_a_path_is_skipped_never_read(tmp_path):
    make_rrsisd(tmp_path / "RRSIS-D")
    instances_path = tmp_path / "RRSIS-D" / "rrsisd" / "instances.json"
    data = json.loads(instances_path.read_text())
    data["images"][1]["file_name"] = "../../../../secret.jpg"
    instances_path.write_text(json.dumps(data))

    name = re.escape("file_name '../../../../secret.jpg' is not a plain file name")
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p\[1\]: id '2_0'.*" + name):
        prepare_dataset("rrsisd", tmp_path / "RRSIS-D", tmp_path / "out", workers=1)
