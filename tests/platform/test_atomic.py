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


# --------------------------------------------------------------------------------------------
# A failure between the two renames, and what killed runs leave behind


@pytest.mark.parametrize("error", [OSError("EIO on rename"), KeyboardInterrupt()])
def test_a_failure_between_the_two_renames_restores_the_old_folder(tmp_path, monkeypatch, error):
    """The swap is two renames (old aside, staging in): if the second fails or is interrupted,
    the old folder goes back in place rather than leaving `target` missing."""
    import os

    target = tmp_path / "best"
    with atomic_dir(target) as staging:
        (staging / "w.bin").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:
            raise error
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(type(error)):
        with atomic_dir(target) as staging:
            (staging / "w.bin").write_text("new")
    monkeypatch.undo()
    assert calls[1][1] == str(target) and ".best.old-" in calls[0][1]  # it failed where meant to
    assert (target / "w.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # no staging, no moved-aside copy


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_killed_runs_is_cleared_and_live_ones_are_kept(tmp_path):
    """A SIGKILLed writer leaves `.NAME.tmp-*` (or, killed mid-swap, `.NAME.old-*`) behind. The
    next atomic_dir of the same target clears those whose process is gone (same machine) or that
    nothing touched for STALE_AFTER_S; a live process's, a fresh one of another machine and
    other targets' siblings stay."""
    import os
    import subprocess
    import sys
    import time

    from rsrefseg.platform import atomic

    target = tmp_path / "best"
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        made = {  # .NAME.tmp-OWNER-PID-RANDOM: OWNER names this machine and PID namespace
            "dead tmp": tmp_path / f".best.tmp-{atomic.OWNER}-{dead}-0123abcd",
            "dead old": tmp_path / f".best.old-{atomic.OWNER}-{dead}-4567abcd",
            "live": tmp_path / f".best.tmp-{atomic.OWNER}-{live.pid}-89abcdef",
            "other machine, fresh": tmp_path / ".best.tmp-0badf00d-123-89abcdef",
            "other machine, old": tmp_path / ".best.tmp-0badf00d-124-89abcdef",
            "bare name, old": tmp_path / ".best.tmp-1234abcd",
            "other target": tmp_path / f".last.tmp-{atomic.OWNER}-{dead}-0123abcd",
            "not a staging name": tmp_path / ".best.tmp-notes",
        }
        for path in made.values():
            (path / "sub").mkdir(parents=True)
            (path / "sub" / "w.bin").write_text("x")
        (tmp_path / ".best.old-0badf00d-5-01234567").write_text("a file sibling, old")  # atomic_file's are files
        long_ago = time.time() - atomic.STALE_AFTER_S - 60
        for path in (made["other machine, old"], made["bare name, old"], tmp_path / ".best.old-0badf00d-5-01234567"):
            for p in (path, *path.rglob("*")):
                os.utime(p, (long_ago, long_ago))
        with atomic_dir(target) as staging:
            (staging / "w.bin").write_text("new")
        left = sorted(p.name for p in tmp_path.iterdir())
        kept = ["live", "other machine, fresh", "other target", "not a staging name"]
        assert left == sorted(["best", *(made[k].name for k in kept)])
        assert (target / "w.bin").read_text() == "new"
    finally:
        live.kill()
        live.wait()
