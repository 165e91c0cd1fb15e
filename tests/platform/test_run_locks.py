"""One writer per run or sweep folder: a second `--resume` (or a second sweep of the same name)
is refused while the first runs; a lock whose process is gone is taken over. No Ray: the jobs
stop before `session.start_ray`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rsrefseg.jobs import session
from rsrefseg.platform import runs, storage
from rsrefseg.platform.config import load_config
from rsrefseg.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SWEEP_FILE = str(REPO / "configs/sweeps/ablation.yaml")


class Preflight(Exception):
    """Raised where the job would check its dataset: the lock was passed."""


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(session, "start_ray", lambda *a, **k: pytest.fail("a Ray resource was taken"))


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(REPO / "configs/demo.yaml", [
        f"train.storage_path={tmp_path / 'runs'}", "tracking.enabled=false", f"paths.root={tmp_path}", *overrides])


def _saved_run(tmp_path: Path) -> Path:
    cfg = _cfg(tmp_path)
    run_dir = runs.storage_root(cfg) / "train-1"
    runs.create_run(run_dir, cfg, None)
    return run_dir


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(folder, host: str, pid: int) -> None:
    (folder / runs.LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "since": "2024-01-01 00:00:00"}))


def test_a_second_resume_while_the_first_runs_is_refused_naming_the_folder_and_holder(tmp_path, no_ray, capsys):
    from rsrefseg.cli import main

    run_dir = _saved_run(tmp_path)
    with runs.lock(run_dir, "run train-1"):  # the first `--resume`, still running
        with pytest.raises(runs.FolderInUse) as err:
            from rsrefseg.jobs.train import run_train

            run_train(_cfg(tmp_path), resume=str(run_dir))
        assert str(run_dir) in str(err.value) and f"process {os.getpid()}" in str(err.value)
        assert socket.gethostname() in str(err.value)
        assert main(["train", "--resume", str(run_dir)]) == 2
        line = capsys.readouterr().err.strip()
        assert len(line.splitlines()) == 1 and "is in use by process" in line
    assert not (run_dir / runs.LOCK_FILE).exists()  # released when the first one ends


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, monkeypatch, no_ray):
    from rsrefseg.jobs import train as train_job

    run_dir = _saved_run(tmp_path)
    _write_lock(run_dir, socket.gethostname(), _dead_pid())  # a resume killed with SIGKILL
    seen = {}

    def preflight(cfg):
        seen["holder"] = json.loads((run_dir / runs.LOCK_FILE).read_text())
        raise Preflight

    monkeypatch.setattr(train_job, "preflight", preflight)
    with pytest.raises(Preflight):
        train_job.run_train(_cfg(tmp_path), resume=str(run_dir))
    assert seen["holder"]["pid"] == os.getpid()
    assert not (run_dir / runs.LOCK_FILE).exists()


def test_a_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    _write_lock(folder, "elsewhere.example", _dead_pid())  # its pid cannot be checked from here
    with pytest.raises(runs.FolderInUse, match=r"elsewhere\.example.*delete .*\.rsrefseg\.lock"):
        with runs.lock(folder, "run r"):
            pass
    assert json.loads((folder / runs.LOCK_FILE).read_text())["host"] == "elsewhere.example"  # left alone


def test_an_object_store_lock_is_written_read_back_and_released(tmp_path):
    from pyarrow import fs

    folder = storage.RemotePath("s3", str(tmp_path / "bucket" / "runs" / "r"), fs.LocalFileSystem())
    local = tmp_path / "bucket" / "runs" / "r"
    local.mkdir(parents=True)
    with runs.lock(folder, "run r"):
        assert json.loads((local / runs.LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(runs.FolderInUse, match="is in use by process"):
            with runs.lock(folder, "run r"):
                pass
    assert not (local / runs.LOCK_FILE).exists()
    _write_lock(local, socket.gethostname(), _dead_pid())
    with runs.lock(folder, "run r"):  # taken over
        assert json.loads((local / runs.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_second_sweep_with_the_same_fixed_name_is_refused(tmp_path, no_ray):
    from rsrefseg.jobs.tune import run_tune

    cfg = _cfg(tmp_path, "tune.name=ablation-fixed")
    first = runs.storage_root(cfg) / "ablation-fixed"
    runs.create_sweep(first, cfg, SWEEP_FILE, None)
    before = (first / runs.SWEEP_INFO).read_text()
    with pytest.raises(ConfigError, match=r"tune\.name: .*ablation-fixed.*--resume.*another tune\.name"):
        run_tune(cfg, sweep_file=SWEEP_FILE)
    assert (first / runs.SWEEP_INFO).read_text() == before


def test_a_sweep_being_resumed_is_locked(tmp_path, no_ray):
    from rsrefseg.jobs.tune import run_tune

    cfg = _cfg(tmp_path, "tune.name=ablation-fixed")
    sweep_dir = runs.storage_root(cfg) / "ablation-fixed"
    runs.create_sweep(sweep_dir, cfg, SWEEP_FILE, None)
    with runs.lock(sweep_dir, "sweep ablation-fixed"):
        with pytest.raises(runs.FolderInUse, match="sweep ablation-fixed: .* is in use by process"):
            run_tune(_cfg(tmp_path), resume=str(sweep_dir))


def test_a_new_sweep_that_fails_early_leaves_no_folder_and_no_lock(tmp_path, monkeypatch, no_ray):
    from rsrefseg.jobs import train as train_job
    from rsrefseg.jobs.tune import run_tune

    def preflight(cfg):
        assert (runs.storage_root(cfg) / "fresh" / runs.LOCK_FILE).is_file()  # held while it runs
        raise Preflight

    monkeypatch.setattr(train_job, "preflight", preflight)
    with pytest.raises(Preflight):
        run_tune(_cfg(tmp_path, "tune.name=fresh"), sweep_file=SWEEP_FILE)
    assert not (tmp_path / "runs" / "fresh").exists()
