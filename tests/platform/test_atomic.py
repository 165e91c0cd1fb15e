"""Write-then-rename: a reader sees the old version or the new one, never a half-written one,
and a failure leaves nothing behind."""

from __future__ import annotations

import pytest

from rsrefseg.platform.atomic import atomic_dir, atomic_file, copy_dir, write_json, write_text


def test_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "table.md"
    with atomic_file(target) as tmp:
        tmp.write_text("half")
        assert not target.exists()  # nothing at the target while it is written
        assert tmp.parent == target.parent and tmp.name.startswith(".table.md.tmp-")
    assert target.read_text() == "half"
    write_text(target, "whole")
    assert target.read_text() == "whole"
    assert [p.name for p in target.parent.iterdir()] == ["table.md"]


def test_failed_file_write_keeps_the_old_version(tmp_path):
    target = tmp_path / "info.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("{broken")
            raise RuntimeError("writer died")
    assert target.read_text().strip() == '{\n  "v": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["info.json"]


def test_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "best"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("1")
    with atomic_dir(target) as staging:
        (staging / "b.txt").write_text("2")
        assert (target / "a.txt").is_file()  # the old folder stays readable until the swap
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_failed_folder_write_leaves_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "best"
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x")
    copy_dir(src, target)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as staging:
            (staging / "partial").write_text("p")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["w.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "src"]
