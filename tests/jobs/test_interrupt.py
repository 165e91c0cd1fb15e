"""Training from a shell, as a user runs it: beside a Ray that `ray start` keeps running (the job
joins it, says so, and sizes itself by its CPUs instead of dying inside `ray.init`, which refuses
num_cpus when it joins), and ended by Ctrl-C or a stop (KILLED in MLflow, the resume line printed)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.network import free_port, kill_tree_using

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture
def local_head_env():
    """A 2-CPU `ray start --head`, and the environment of a shell on the same machine.

    Ray records the last `ray start` under its temp dir (RAY_TMPDIR/ray), where `ray.init()` finds
    it; a private temp dir keeps this head out of sight of the other tests' Rays and theirs out of
    this one's, and lets teardown stop exactly its processes."""
    ray_tmp = Path(f"/tmp/rsr-head-{os.getpid()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    ports = [f"--port={free_port()}", f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--metrics-export-port={free_port()}"]
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2", "--disable-usage-stats",
                        f"--temp-dir={ray_tmp / 'ray'}", *ports], check=True, env=env, capture_output=True)
        yield env
    finally:
        kill_tree_using(str(ray_tmp))
        subprocess.run(["rm", "-rf", str(ray_tmp)])


def _db(home: Path, query: str) -> list[tuple]:
    db = home / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute(query).fetchall()
        except sqlite3.OperationalError:  # the store is still being created
            return []


def _run_status(home: Path) -> list[tuple[str, str]]:
    return _db(home, "select name, status from runs")


def _validated(home: Path) -> bool:
    """An epoch has been trained and validated (its val/gIoU is in MLflow)."""
    return bool(_db(home, "select 1 from metrics where key = 'val/gIoU'"))


@pytest.mark.timeout(600)
def test_a_run_beside_ray_start_joins_it_and_runs_end_honestly_on_ctrl_c_or_stop(local_head_env, prepared_dataset,
                                                                                tmp_path):
    train = [str(BIN / "rsrefseg"), "train", "--config", str(REPO / "configs/demo.yaml"),
             f"data.path={prepared_dataset}", "train.figure_samples=0"]
    # Three fresh processes, side by side so their start-ups overlap. "refused" and "ctrl-c" run in
    # a shell beside the `ray start` head; "stop" in one with no Ray running (its own local Ray).
    # demo.yaml would start a 4-CPU Ray (cluster.num_cpus); the running one has 2, which two 1-CPU
    # workers would fill, leaving Ray Data none: a clear refusal, no traceback. Half a CPU each fits.
    plain_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    short = ["train.epochs=50", "data.limit=16", "train.batch_size=4"]  # short epochs, many of them
    runs = {}
    for name, sig, env, extra in (
        ("refused", None, local_head_env, ["train.epochs=1"]),
        ("ctrl-c", signal.SIGINT, local_head_env, [*short, "train.cpus_per_worker=0.5"]),
        ("stop", signal.SIGTERM, plain_env, short),
    ):
        home = tmp_path / name
        home.mkdir()
        log = open(home / "stderr.log", "w")
        proc = subprocess.Popen([*train, *extra], cwd=home, env={**env, "RSREFSEG_HOME": str(home)},
                                stdout=subprocess.DEVNULL, stderr=log, text=True)
        runs[name] = (home, sig, proc, log)
    try:
        home, _, refused, log = runs["refused"]
        refused.wait(timeout=300)
        log.close()
        err = (home / "stderr.log").read_text()
        assert refused.returncode == 2, err[-3000:]
        assert "joining the Ray already running on this machine" in err
        assert "of the 2 CPUs of the Ray already running on this machine" in err
        assert "Traceback" not in err
        del runs["refused"]

        # Into the training proper: an epoch trained and validated in each.
        deadline = time.monotonic() + 400
        while not all(_validated(home) for home, *_ in runs.values()) and time.monotonic() < deadline:
            assert all(proc.poll() is None for _, _, proc, _ in runs.values()), "a run ended early"
            time.sleep(1)
        assert all(_validated(home) for home, *_ in runs.values()), "a run never finished an epoch"
        for home, sig, proc, _ in runs.values():
            proc.send_signal(sig)
        for home, sig, proc, log in runs.values():
            proc.wait(timeout=240)
            log.close()
            err = (home / "stderr.log").read_text()
            # Ctrl-C exits 130. After SIGTERM, Ray's own C++ signal handler ends the process
            # (SIGABRT) once the run is closed; what a stopped job needs is the MLflow state and
            # the log line.
            assert proc.returncode == 130 if sig == signal.SIGINT else proc.returncode != 0, err[-3000:]
            assert "was interrupted" in err and "rsrefseg train --resume" in err, err[-3000:]
            ((_, status),) = _run_status(home)
            assert status == "KILLED", (sig, status)
        # The one beside `ray start` trained on that Ray, not on one of its own.
        assert "joining the Ray already running on this machine" in (tmp_path / "ctrl-c" / "stderr.log").read_text()
        assert "joining" not in (tmp_path / "stop" / "stderr.log").read_text()
    finally:
        for _, _, proc, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
