"""Publishing a prepared dataset in versions, locally and on S3 (moto on loopback, tests/s3.py).

Each prepare writes its shards under a version prefix of its own (`<out>/v-TIME-RANDOM/...`)
and publishes them by writing `<out>/manifest.json` last; the version it replaces stays readable
until then and is deleted after. So a replacement that fails, or is SIGKILLed at any point,
leaves the previous dataset published and whole; a reader sees one version; two prepares to one
`out` end with one dataset and one clear error; datasets prepared before versions still load.
Shard paths in a manifest are checked to lie inside their dataset.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import fs

import rsrefseg.datasets.prepare as prepare_module
from rsrefseg.datasets.prepare import MANIFEST, VERSION, load_manifest, prepare_dataset
from rsrefseg.datasets.triplet import DatasetError
from rsrefseg.platform import atomic, storage
from rsrefseg.platform.storage import StorageError

BACKENDS = ["local", "s3"]


@pytest.fixture(params=BACKENDS)
def out(request, tmp_path) -> str:
    """Where a dataset is prepared: a local folder, or a prefix of a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_server").new_bucket()
    return f"s3://{bucket}/prepared"


def filesystem(out: str) -> tuple[fs.FileSystem, str]:
    where = storage.location(out)
    if isinstance(where, storage.RemotePath):
        return where.fs, where.path
    return fs.LocalFileSystem(), str(Path(where).resolve())


def files(out: str) -> list[str]:
    """Every file under `out` (paths relative to it), without pyarrow's empty "folder/" markers."""
    filesystem_, base = filesystem(out)
    found = filesystem_.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path[len(base) + 1:] for i in found if i.type == fs.FileType.File)


def published(manifest: dict) -> list[str]:
    """What a published dataset consists of: its manifest and the shards it lists, nothing else."""
    return sorted([MANIFEST, *(s["path"] for split in manifest["shards"].values() for s in split)])


def versions(manifest: dict) -> set[str]:
    return {s["path"].split("/")[0] for split in manifest["shards"].values() for s in split}


def assert_whole(out: str, manifest: dict) -> None:
    """`manifest` is the one published at `out`, and every shard it lists reads, with its rows."""
    assert load_manifest(out) == manifest
    filesystem_, base = filesystem(out)
    for split, shards in manifest["shards"].items():
        tables = [pq.read_table(f"{base}/{s['path']}", filesystem=filesystem_) for s in shards]
        assert [t.num_rows for t in tables] == [s["rows"] for s in shards]
        assert sum(t.num_rows for t in tables) == manifest["counts"][split]
        assert {r for t in tables for r in t.column("split").to_pylist()} == {split}


def without_version(manifest: dict) -> dict:
    """The manifest with its shard paths as a dataset prepared before versions lists them."""
    shards = {split: [{**s, "path": s["path"].split("/", 1)[1]} for s in listed]
              for split, listed in manifest["shards"].items()}
    return {**manifest, "shards": shards}


# --------------------------------------------------------------------------------------------
# The layout


def test_a_version_prefix_holds_the_shards_and_the_manifest_lists_them_from_the_dataset(out, synthetic_root,
                                                                                        prepared_synthetic):
    manifest = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=8)
    (version,) = versions(manifest)
    assert VERSION.fullmatch(version)
    assert all(s["path"].startswith(f"{version}/{split}/part-") for split, shards in manifest["shards"].items()
               for s in shards)
    assert files(out) == published(manifest)  # no lock, probe or staging left
    assert_whole(out, manifest)
    # The same samples and shards as any other prepare of them: only the version differs; the
    # content hash is of the samples, so it is the same too.
    assert without_version(manifest) == without_version(load_manifest(prepared_synthetic))
    text = (storage.location(out) / MANIFEST).read_text()
    assert text == json.dumps(manifest, indent=2) + "\n"


def test_a_dataset_prepared_before_versions_loads_and_a_replacement_removes_its_shards(out, synthetic_root,
                                                                                       ray_session):
    from rsrefseg.datasets.pipeline import read_split

    # Lay a dataset out as earlier versions of prepare did: <out>/<split>/part-NNNNN.parquet.
    versioned = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=8)
    filesystem_, base = filesystem(out)
    (version,) = versions(versioned)
    for path in files(out):
        if path != MANIFEST:
            filesystem_.create_dir(f"{base}/{path.split('/')[1]}", recursive=True)
            filesystem_.move(f"{base}/{path}", f"{base}/{path.split('/', 1)[1]}")
    filesystem_.delete_dir(f"{base}/{version}")
    old = without_version(versioned)
    (storage.location(out) / MANIFEST).write_text(json.dumps(old, indent=2) + "\n")
    assert files(out) == published(old) and not any(p.startswith("v-") for p in files(out))

    assert_whole(out, old)
    rows = read_split(out, "train").take_all()
    assert sorted(r["index"] for r in rows) == list(range(old["counts"]["train"]))

    new = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=16)
    assert files(out) == published(new)  # the old split folders are gone, the new version alone
    assert_whole(out, new)
    assert new["content_hash"] == old["content_hash"]


# --------------------------------------------------------------------------------------------
# Replacing: the previous dataset stays published until the new one is complete


def test_the_previous_dataset_stays_published_and_readable_while_its_replacement_is_written(
        out, synthetic_root, monkeypatch, ray_session):
    from rsrefseg.datasets.pipeline import read_split

    old = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=4)
    old_rows = sorted(r["id"] for r in read_split(out, "train").take_all())
    seen = []
    real = prepare_module._open_shard

    def open_shard(target, path):
        if len(seen) == 0 or (len(seen) == 1 and path.startswith("test/")):  # the first shard, and late
            assert_whole(out, old)
            rows = read_split(out, "train").take_all()  # a reader of one version: the old one, all of it
            seen.append(sorted(r["id"] for r in rows))
        return real(target, path)

    monkeypatch.setattr(prepare_module, "_open_shard", open_shard)
    new = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=16)
    assert seen == [old_rows, old_rows]
    assert versions(new) != versions(old)
    assert files(out) == published(new)  # the old version deleted once the new one is published
    assert_whole(out, new)


class Outage:
    """Breaks the writing of the second shard, as a dropped connection (or a full disk) would."""

    def __init__(self, monkeypatch, out: str):
        self.calls = 0
        real = prepare_module._open_shard
        message = ("When uploading part: AWS Error NETWORK_CONNECTION during UploadPart operation: Connection reset"
                   if out.startswith("s3://") else "No space left on device")

        def open_shard(target, path):
            self.calls += 1
            if self.calls == 2:
                raise OSError(message)
            return real(target, path)

        monkeypatch.setattr(prepare_module, "_open_shard", open_shard)


def test_a_failed_replacement_leaves_the_previous_dataset_published_and_whole(out, synthetic_root, monkeypatch):
    old = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=8)
    Outage(monkeypatch, out)
    remote = out.startswith("s3://")
    with pytest.raises(StorageError if remote else OSError, match="NETWORK_CONNECTION" if remote else "No space") as info:
        prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=4)
    assert files(out) == published(old)  # the new version's first shard removed again
    assert_whole(out, old)
    if remote:
        assert f"--out: writing {out} failed, nothing was published there (the previous dataset, if any, is " \
               "unchanged): S3 at" in str(info.value)


def test_a_first_local_prepare_that_fails_leaves_no_folder(tmp_path, synthetic_root, monkeypatch):
    out = str(tmp_path / "out")
    Outage(monkeypatch, out)
    with pytest.raises(OSError, match="No space"):
        prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # as before: no folder, no lock, no version


def test_a_local_filesystem_without_locks_still_prepares(tmp_path, synthetic_root, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    manifest = prepare_dataset("synthetic", synthetic_root, tmp_path / "out", rows_per_shard=8)
    assert files(str(tmp_path / "out")) == published(manifest)
    assert "this filesystem has no file locks" in caplog.text


# --------------------------------------------------------------------------------------------
# Killed at any moment

CHILD = """
import sys, time
import rsrefseg.datasets.prepare as p

root, out, point, ready = sys.argv[1:5]

def pause(*args, **kwargs):
    open(ready, "w").close()
    time.sleep(600)  # until SIGKILLed

if point == "first shard written":  # the first shard is closed (whole in the store) as the second opens
    real, opened = p._open_shard, []
    def open_shard(target, path):
        opened.append(path)
        if len(opened) == 2:
            pause()
        return real(target, path)
    p._open_shard = open_shard
elif point == "every shard written":  # just before the manifest is re-read and written
    p._check_unchanged = pause
elif point == "manifest written":  # published, the old version not yet deleted
    p._confirm_published = pause
p.prepare_dataset("synthetic", root, out, rows_per_shard=4)
"""


def run_until_killed(root: Path, out: str, point: str, tmp_path: Path, env: dict) -> None:
    """Run a prepare in a process of its own, SIGKILL it once it reaches `point`."""
    ready = tmp_path / f"ready-{point.replace(' ', '-')}"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), out, point, str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, f"the prepare ended (exit {child.returncode}) before {point!r}"
            assert time.monotonic() < deadline, f"the prepare never reached {point!r}"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", ["first shard written", "every shard written", "manifest written"])
def test_a_prepare_killed_at_any_point_leaves_a_whole_dataset_and_the_next_one_cleans_up(
        out, point, synthetic_root, tmp_path, request):
    env = dict(os.environ)
    if out.startswith("s3://"):
        env.update(request.getfixturevalue("s3_server").env())
    old = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=8)

    run_until_killed(synthetic_root, out, point, tmp_path, env)
    after_kill = load_manifest(out)
    # Published and whole: the old dataset, or the new one once its manifest was written.
    assert_whole(out, after_kill)
    assert after_kill == old if point != "manifest written" else after_kill["content_hash"] == old["content_hash"]
    leftovers = {p.split("/")[0] for p in files(out) if p not in published(after_kill) and p != prepare_module.LOCK}

    new = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=16)
    assert files(out) == published(new)  # the killed version (or the old one) removed as stale
    assert_whole(out, new)
    if not out.startswith("s3://"):
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ready-")) == ["out"]
    # What the kill left: the killed prepare's unpublished version, or the replaced one.
    if point == "manifest written":
        assert versions(after_kill) != versions(old) and leftovers == versions(old)
    else:
        assert len(leftovers) == 1 and VERSION.fullmatch(leftovers.pop())


# --------------------------------------------------------------------------------------------
# Two prepares to one out


def test_two_prepares_to_one_out_end_with_one_dataset_and_one_clear_error(out, synthetic_root, monkeypatch):
    """The second prepare starts and finishes while the first is writing."""
    old = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=8)
    real, other = prepare_module._open_shard, {}

    def open_shard(target, path):
        if not other:
            other["started"] = True
            try:
                other["manifest"] = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=16)
            except DatasetError as exc:
                other["error"] = str(exc)
        return real(target, path)

    monkeypatch.setattr(prepare_module, "_open_shard", open_shard)
    if out.startswith("s3://"):
        # No lock on a store: the second publishes, and the first fails as it is about to.
        with pytest.raises(DatasetError, match=rf"another prepare published a dataset at {out} while this one was "
                                               "writing; its dataset stays published and this one's shards were removed"):
            prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=4)
        winner = other["manifest"]
    else:
        # A local folder is locked while written: the second fails at once, writing nothing.
        winner = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=4)
        assert "manifest" not in other
        assert f"another prepare is writing to {out} (it holds {out}/.prepare.lock)" in other["error"]
    assert versions(winner) != versions(old)
    assert files(out) == published(winner)
    assert_whole(out, winner)


def test_two_prepares_publishing_at_the_same_moment_leave_the_last_and_fail_the_first(s3_server, synthetic_root,
                                                                                      monkeypatch):
    """Both passed the check before publishing (an object store has no conditional write); the
    second manifest lands right after the first: the first prepare sees it and fails."""
    out = f"s3://{s3_server.new_bucket()}/prepared"
    prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=8)
    real, other = atomic.write_text, {}

    def write_text(target, text):
        result = real(target, text)
        if str(target).endswith(MANIFEST) and not other:
            other["manifest"] = None
            other["manifest"] = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=16)
        return result

    monkeypatch.setattr(atomic, "write_text", write_text)
    with pytest.raises(DatasetError, match=rf"another prepare published a dataset at {out} at the same moment"):
        prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=4)
    assert files(out) == published(other["manifest"])
    assert_whole(out, other["manifest"])


def test_a_manifest_landing_on_a_version_just_deleted_is_replaced_by_the_whole_one(s3_server, synthetic_root,
                                                                                  monkeypatch):
    """The narrowest race: the first prepare passed its check; the second publishes and deletes
    the first's version (it started earlier); only then does the first's manifest land, naming
    shards that are gone. The second puts its own manifest back, and the first fails."""
    out = f"s3://{s3_server.new_bucket()}/prepared"
    prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=8)
    real_write, real_remove, state = atomic.write_text, prepare_module._remove_version, {}

    def write_text(target, text):
        if str(target).endswith(MANIFEST) and "first" not in state:
            state["first"] = text  # the first prepare's manifest: it lands during the second's cleanup
            state["second"] = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=16)
            return None
        return real_write(target, text)

    def remove_version(where, version):
        real_remove(where, version)
        if version in state.get("first", "") and "landed" not in state:
            state["landed"] = real_write(storage.location(out) / MANIFEST, state["first"])

    monkeypatch.setattr(atomic, "write_text", write_text)
    monkeypatch.setattr(prepare_module, "_remove_version", remove_version)
    with pytest.raises(DatasetError, match=rf"another prepare published a dataset at {out} at the same moment"):
        prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=4)
    assert "landed" in state
    assert files(out) == published(state["second"])
    assert_whole(out, state["second"])


# --------------------------------------------------------------------------------------------
# A reader of a version that a replacement deleted


def test_a_pipeline_still_streaming_a_deleted_version_fails_naming_its_shard(out, synthetic_root, ray_session):
    from rsrefseg.datasets.pipeline import read_split

    old = prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=8)
    ds = read_split(out, "train")  # reads the manifest once: its shards are the old version's
    prepare_dataset("synthetic", synthetic_root, out, rows_per_shard=16)
    with pytest.raises(Exception, match=r"(?s)FileNotFoundError.*/v-[^/]+/train/part-0000\d\.parquet") as info:
        ds.take_all()  # never a mix of the old version's shards and the new one's
    (old_version,) = versions(old)
    assert f"{old_version}/train/part-0000" in str(info.value)
    assert len(read_split(out, "train").take_all()) == old["counts"]["train"]  # run again: the new version


# --------------------------------------------------------------------------------------------
# Shard paths stay inside their dataset

OUTSIDE = {
    "parent": "../other/train/part-00000.parquet",
    "parent inside": "train/../../other/train/part-00000.parquet",
    "absolute": "/etc/passwd",
    "another bucket": "s3://other-bucket/prepared/train/part-00000.parquet",
    "a scheme-less bucket path": "//other-bucket/train/part-00000.parquet",
    "dot segment": "./train/part-00000.parquet",
    "backslash": "..\\other\\part-00000.parquet",
    "not a string": None,
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_a_manifest_naming_a_shard_outside_its_dataset_is_refused(out, case, ray_session):
    from rsrefseg.datasets.pipeline import read_split

    bad = OUTSIDE[case]
    manifest = {"schema_version": prepare_module.SCHEMA_VERSION, "counts": {"train": 2},
                "shards": {"train": [{"path": "train/part-00000.parquet", "rows": 1}, {"path": bad, "rows": 1}]}}
    (storage.location(out) / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    (storage.location(out) / MANIFEST).write_text(json.dumps(manifest))
    message = re.escape(f"{out}/manifest.json: shard {bad!r} of split 'train' is not inside the dataset")
    for read in (load_manifest, lambda o: read_split(o, "train")):
        with pytest.raises(DatasetError, match=message):
            read(out)


def test_the_pipeline_checks_shard_paths_where_it_joins_them(tmp_path):
    from rsrefseg.datasets.pipeline import _shard_files

    assert _shard_files(tmp_path, [{"path": "v-1/train/part-00000.parquet"}])[0] == [
        str(tmp_path.resolve() / "v-1/train/part-00000.parquet")]
    for bad in ("../x/part-00000.parquet", "/abs/part-00000.parquet", "s3://b/part-00000.parquet"):
        with pytest.raises(DatasetError, match=rf"{tmp_path}/manifest.json: shard '.*' of split .* is not inside"):
            _shard_files(tmp_path, [{"path": bad}])
