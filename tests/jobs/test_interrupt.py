"""Ctrl-C or a stop ends a training run honestly: KILLED in MLflow, the resume line printed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _run_status(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("select name, status from runs").fetchall()
        except sqlite3.OperationalError:  # the store is still being created
            return []


@pytest.mark.timeout(600)
def test_interrupted_training_is_killed_in_mlflow_and_says_how_to_resume(prepared_dataset, tmp_path):
    # Two fresh processes, each with its own local Ray, as a user's terminal (SIGINT, Ctrl-C) and
    # `rsrefseg jobs stop` (SIGTERM) leave them; run side by side, so their start-ups overlap.
    runs = {}
    for name, sig in (("ctrl-c", signal.SIGINT), ("stop", signal.SIGTERM)):
        home = tmp_path / name
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RSREFSEG_HOME"] = str(home)
        log = open(home / "stderr.log", "w")
        proc = subprocess.Popen(
            [str(BIN / "rsrefseg"), "train", "--config", str(REPO / "configs/demo.yaml"),
             f"data.path={prepared_dataset}", "train.epochs=50", "train.figure_samples=0"],
            cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True,
        )
        runs[name] = (home, sig, proc, log)
    try:
        deadline = time.monotonic() + 300
        while not all(_run_status(home / "mlflow.db") for home, *_ in runs.values()) and time.monotonic() < deadline:
            time.sleep(1)
        assert all(_run_status(home / "mlflow.db") for home, *_ in runs.values()), "a run never started"
        time.sleep(20)  # into the training proper: workers up, batches flowing
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
            ((_, status),) = _run_status(home / "mlflow.db")
            assert status == "KILLED", (sig, status)
    finally:
        for _, _, proc, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
