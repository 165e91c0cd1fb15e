"""A prepare interrupted or killed, run again with the same arguments, keeps the shards it
finished (checked against their recorded hashes, only while the source is unchanged) and its
validation, and writes the rest: the published dataset is the one an uninterrupted prepare
publishes, shard for shard, with the same content hash. Locally and on S3 (moto, tests/s3.py).
Staging no prepare will resume is removed, never published; a live prepare's is left alone.
Also the progress bar prepare shows (rate, ETA)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from pyarrow import fs

import rsrefseg.datasets.prepare as prepare_module
from rsrefseg.datasets import resume
from rsrefseg.datasets.prepare import MANIFEST, VERSION, load_manifest, prepare_dataset
from rsrefseg.platform import atomic, console, storage

from .conftest import make_refsegrs

ROWS = 4  # rows a shard: 40 samples -> train 6 shards, val 2, test 2
COUNTS = (("train", 24), ("val", 8), ("test", 8))
TOTAL = sum(n for _, n in COUNTS)


@pytest.fixture
def source(tmp_path) -> Path:
    """A RefSegRS folder as distributed (conftest.make_refsegrs), 40 samples."""
    make_refsegrs(tmp_path / "src", counts=COUNTS, repeat_mask=False)
    return tmp_path / "src"


def filesystem(out: str) -> tuple[fs.FileSystem, str]:
    where = storage.location(out)
    if isinstance(where, storage.RemotePath):
        return where.fs, where.path
    return fs.LocalFileSystem(), str(Path(where).resolve())


def files(out: str) -> list[str]:
    """Every file under `out` (paths relative to it)."""
    filesystem_, base = filesystem(out)
    found = filesystem_.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path[len(base) + 1:] for i in found if i.type == fs.FileType.File)


def read(out: str, relative: str) -> bytes:
    filesystem_, base = filesystem(out)
    with filesystem_.open_input_stream(f"{base}/{relative}") as f:
        return f.read()


def published(manifest: dict) -> list[str]:
    return sorted([MANIFEST, *(s["path"] for split in manifest["shards"].values() for s in split)])


def versions(manifest: dict) -> set[str]:
    return {s["path"].split("/")[0] for split in manifest["shards"].values() for s in split}


def without_version(manifest: dict) -> dict:
    shards = {split: [{**s, "path": s["path"].split("/", 1)[1]} for s in listed] for split, listed in manifest["shards"].items()}
    return {**manifest, "shards": shards}


def assert_same_dataset(out: str, manifest: dict, fresh: Path, fresh_manifest: dict) -> None:
    """`manifest` (published at `out`) is what the uninterrupted prepare into `fresh` published:
    the same manifest but for the version's name, the same content hash, byte-identical shards,
    and nothing else left at `out` (no journal, no staging)."""
    assert load_manifest(out) == manifest
    assert without_version(manifest) == without_version(fresh_manifest)
    assert manifest["content_hash"] == fresh_manifest["content_hash"]
    for split, shards in manifest["shards"].items():
        for ours, theirs in zip(shards, fresh_manifest["shards"][split]):
            assert read(out, ours["path"]) == (fresh / theirs["path"]).read_bytes(), ours["path"]
    assert files(out) == published(manifest)


class Decodes:
    """Counts the samples decoded (validation and writing both decode through `load_pair`)."""

    def __init__(self, monkeypatch):
        self.count, real = 0, prepare_module.load_pair

        def load_pair(t):
            self.count += 1
            return real(t)

        monkeypatch.setattr(prepare_module, "load_pair", load_pair)


# --------------------------------------------------------------------------------------------
# Killed midway

CHILD = """
import sys, time
import rsrefseg.datasets.prepare as p
from rsrefseg.datasets import resume

root, out, ready, after, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
real_record, real_open, recorded = resume.record_shard, p._open_shard, []

def record_shard(*args):
    real_record(*args)
    recorded.append(args)

def open_shard(target, path):
    shard = real_open(target, path)
    if len(recorded) == after:  # `after` shards finished and journaled; the next one's file open
        open(ready, "w").close()
        time.sleep(600)  # until SIGKILLed
    return shard

resume.record_shard, p._open_shard = record_shard, open_shard
p.prepare_dataset("refsegrs", root, out, rows_per_shard=rows)
"""


def kill_midway(root: Path, out: str, tmp_path: Path, *, after: int, rows: int = ROWS, env: dict | None = None) -> str:
    """Run a prepare in a process of its own and SIGKILL it once `after` shards are finished;
    return the version it was writing."""
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), out, str(ready), str(after), str(rows)],
                             env=env or dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, f"the prepare ended (exit {child.returncode}) before it was killed"
            assert time.monotonic() < deadline, "the prepare never finished its shards"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    (version,) = {p.split("/")[0] for p in files(out) if VERSION.fullmatch(p.split("/")[0])}
    records = [p for p in files(out) if p.startswith(f"{version}/.resume/") and "/part-" in p]
    assert len(records) == after
    return version


def test_a_prepare_killed_midway_resumes_keeping_its_finished_shards_and_publishes_the_same(
        source, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "out")
    killed = kill_midway(source, out, tmp_path, after=3)
    assert not (tmp_path / "out" / MANIFEST).exists()  # nothing published by the killed one

    decodes = Decodes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="rsrefseg"):
        manifest = prepare_dataset("refsegrs", source, out, rows_per_shard=ROWS)
    assert "kept 3 finished shard(s) (12 samples)" in caplog.text
    assert "the validation of 40 sample(s) is kept" in caplog.text
    # Neither validated again nor written again: only the 28 samples of the shards it lacked.
    assert decodes.count == TOTAL - 3 * ROWS
    assert versions(manifest) == {killed}  # the killed prepare's version, finished and published

    monkeypatch.undo()
    fresh = prepare_dataset("refsegrs", source, tmp_path / "fresh", rows_per_shard=ROWS)
    assert_same_dataset(out, manifest, tmp_path / "fresh", fresh)


def test_an_interrupted_prepare_keeps_its_staging_and_resumes(source, tmp_path, monkeypatch, caplog):
    """Ctrl-C (or SIGTERM, which the CLI turns into the same) inside the process."""
    out = str(tmp_path / "out")
    real, recorded = resume.record_shard, []

    def record_shard(*args):
        real(*args)
        recorded.append(args)
        if len(recorded) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume, "record_shard", record_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("refsegrs", source, out, rows_per_shard=ROWS)
    monkeypatch.undo()
    assert "run the same prepare again to resume it" in caplog.text
    decodes = Decodes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="rsrefseg"):
        manifest = prepare_dataset("refsegrs", source, out, rows_per_shard=ROWS)
    assert "kept 2 finished shard(s) (8 samples)" in caplog.text and decodes.count == TOTAL - 2 * ROWS
    monkeypatch.undo()
    fresh = prepare_dataset("refsegrs", source, tmp_path / "fresh", rows_per_shard=ROWS)
    assert_same_dataset(out, manifest, tmp_path / "fresh", fresh)


def test_a_tampered_finished_shard_is_written_again(source, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "out")
    killed = kill_midway(source, out, tmp_path, after=3)
    shard = tmp_path / "out" / killed / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))

    decodes = Decodes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="rsrefseg"):
        manifest = prepare_dataset("refsegrs", source, out, rows_per_shard=ROWS)
    # part-00000 kept; part-00001 fails its hash, so it and part-00002 are written again.
    assert "kept 1 finished shard(s) (4 samples)" in caplog.text
    assert decodes.count == TOTAL - ROWS
    monkeypatch.undo()
    fresh = prepare_dataset("refsegrs", source, tmp_path / "fresh", rows_per_shard=ROWS)
    assert_same_dataset(out, manifest, tmp_path / "fresh", fresh)


def test_a_changed_source_keeps_nothing_and_publishes_the_changed_dataset(source, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "out")
    before = prepare_dataset("refsegrs", source, tmp_path / "before", rows_per_shard=ROWS)
    killed = kill_midway(source, out, tmp_path, after=3)
    mask = tifffile.imread(source / "masks" / "2.tif")  # a train sample, in a finished shard
    tifffile.imwrite(source / "masks" / "2.tif", np.where(mask > 0, 0, 255).astype(np.uint8))

    decodes = Decodes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="rsrefseg"):
        manifest = prepare_dataset("refsegrs", source, out, rows_per_shard=ROWS)
    assert "kept" not in caplog.text and decodes.count == 2 * TOTAL  # validated and written, all of it
    assert killed not in versions(manifest) and not (tmp_path / "out" / killed).exists()
    monkeypatch.undo()
    fresh = prepare_dataset("refsegrs", source, tmp_path / "fresh", rows_per_shard=ROWS)
    assert_same_dataset(out, manifest, tmp_path / "fresh", fresh)
    assert manifest["content_hash"] != before["content_hash"]


def test_the_staging_of_a_dead_prepare_with_other_arguments_is_removed_and_never_published(
        source, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    killed = kill_midway(source, out, tmp_path, after=2, rows=ROWS)
    seen, real = [], prepare_module._open_shard

    def open_shard(target, path):
        seen.append((tmp_path / "out" / killed).exists())
        return real(target, path)

    monkeypatch.setattr(prepare_module, "_open_shard", open_shard)
    decodes = Decodes(monkeypatch)
    manifest = prepare_dataset("refsegrs", source, out, rows_per_shard=2 * ROWS)
    assert decodes.count == 2 * TOTAL  # nothing kept: other shard bounds
    assert seen and not any(seen)  # removed before this prepare wrote its first shard
    assert versions(manifest) != {killed} and files(out) == published(manifest)


def test_a_prepare_killed_midway_on_s3_resumes_and_publishes_the_same(s3_server, source, tmp_path, monkeypatch, caplog):
    out = f"s3://{s3_server.new_bucket()}/prepared"
    killed = kill_midway(source, out, tmp_path, after=4, env={**os.environ, **s3_server.env()})
    assert MANIFEST not in files(out)

    decodes = Decodes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="rsrefseg"):
        manifest = prepare_dataset("refsegrs", source, out, rows_per_shard=ROWS)
    assert "kept 4 finished shard(s) (16 samples)" in caplog.text and decodes.count == TOTAL - 4 * ROWS
    assert versions(manifest) == {killed}
    monkeypatch.undo()
    fresh = prepare_dataset("refsegrs", source, tmp_path / "fresh", rows_per_shard=ROWS)
    assert_same_dataset(out, manifest, tmp_path / "fresh", fresh)


# --------------------------------------------------------------------------------------------
# Whose staging may be resumed or removed


def test_only_a_staging_whose_owner_is_gone_is_resumed_or_removed(tmp_path):
    out, version = tmp_path / "out", "v-20250101T000000.000Z-0123abcd"
    record = out / version / resume.JOURNAL / resume.STAGING
    record.parent.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        cases = [  # owner, pid, age of the staging (s), gone?
            (atomic.OWNER, live.pid, 0, False),  # a live prepare on this machine
            (atomic.OWNER, dead.pid, 0, True),  # its process is gone
            ("0badc0de", 1, 0, False),  # another machine's, fresh: it may be writing
            ("0badc0de", 1, atomic.STALE_AFTER_S + 60, True),  # another machine's, untouched for 6 h
        ]
        for owner, pid, age, gone in cases:
            record.write_text(json.dumps({"fingerprint": "f", "owner": owner, "pid": pid}))
            os.utime(record, (time.time() - age, time.time() - age))
            assert (resume.find(out, "f", set(), locked=False) == version) is gone, (owner, pid, age)
            assert (resume.abandoned(out, set(), locked=False) == [version]) is gone, (owner, pid, age)
            assert resume.find(out, "other", set(), locked=False) is None  # another fingerprint: never resumed
            assert resume.find(out, "f", {version}, locked=False) is None  # a published version: never resumed
            # Holding prepare's lock on a local folder: no other prepare writes there.
            assert resume.find(out, "f", set(), locked=True) == version
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------------------------
# The progress bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_text_shows_rate_and_eta():
    assert console.bar_text("writing", 250, 1000, 10.0) == (
        "writing [######..................] 250/1000 25.0 samples/s ETA 0:00:30")
    assert console.bar_text("validating", 0, 40, 0.0) == (
        "validating [........................] 0/40 0.0 samples/s ETA ?")
    assert console.bar_text("writing", 40, 40, 2.0).startswith("writing [########################] 40/40 20.0 samples/s")
    assert console.duration(3725) == "1:02:05"


def test_the_progress_bar_draws_in_place_on_a_terminal_only(monkeypatch):
    now = [0.0]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with console.ProgressBar("writing", 4, clock=lambda: now[0]) as bar:
        for _ in range(4):
            now[0] += 0.5
            bar.update()
    drawn = terminal.getvalue()
    assert drawn.startswith("\rwriting [") and drawn.endswith("\n") and drawn.count("\n") == 1
    assert "4/4 2.0 samples/s ETA 0:00:00" in drawn

    piped = io.StringIO()  # a pipe or a log file: nothing drawn
    monkeypatch.setattr(sys, "stderr", piped)
    with console.ProgressBar("writing", 4) as bar:
        bar.update(4)
    assert piped.getvalue() == ""


def test_prepare_shows_a_progress_bar_for_validating_and_writing(source, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    prepare_dataset("refsegrs", source, tmp_path / "out", rows_per_shard=ROWS, progress=True)
    # Each bar redrawn in place ("\r", erase to the end), then its line ended.
    lines = [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in terminal.getvalue().split("\n")[:-1]]
    assert [line.split(" [")[0] for line in lines] == ["validating", "writing"]
    assert all(f" {TOTAL}/{TOTAL} " in line and " samples/s ETA " in line for line in lines)
