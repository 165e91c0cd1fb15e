"""Training from a shell, as a user runs it and reads it.

Three fresh `rsrefseg train` processes, side by side so that their start-ups overlap (each costs
half a minute of Ray, torch and DeepSpeed start-up on 2 cores):

- "refused" and "ctrl-c" run in a shell beside a `ray start` head: the job joins that Ray, says
  so, and sizes itself by its CPUs instead of dying inside `ray.init` (which refuses num_cpus
  when it joins); "ctrl-c" runs with --verbose and is ended by Ctrl-C.
- "stop" runs in a shell with no Ray running (its own local Ray), quiet, and is ended by a stop
  (SIGTERM).

What the tests read: the platform's voice on the console and Ray's own output (Ray Data's
progress and execution notices, Ray Train's per-rank reports) in the log file the run names, back
on the console with --verbose; and a run ended by Ctrl-C or a stop ending honestly (KILLED in
MLflow, the resume line printed)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.network import free_port, kill_tree_using

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

RAY_CHATTER = ("Reporting training result", "TrainingReport(", "Checkpoint successfully created",
               "Execution plan of Dataset", "row/s]")


@pytest.fixture(scope="module")
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


@dataclass
class ShellRun:
    home: Path
    signal: signal.Signals | None
    returncode: int
    printed: str  # stdout and stderr, as a terminal shows them
    stderr: str

    def log(self) -> Path:
        """The log file the run named on the console."""
        (path,) = re.findall(r"^\[rsrefseg\] log: (\S+)", self.printed, re.M)
        return Path(path)


def _ready(home: Path, waits_for: str) -> bool:
    """An epoch has been trained and validated (its val/gIoU is in MLflow), and the console shows
    `waits_for` (Ray Train's report of it, for the --verbose run)."""
    printed = "".join((home / name).read_text() for name in ("stdout.log", "stderr.log"))
    return bool(_db(home, "select 1 from metrics where key = 'val/gIoU'")) and waits_for in printed


@pytest.fixture(scope="module")
def shell_runs(local_head_env, prepared_dataset, tmp_path_factory) -> dict[str, ShellRun]:
    tmp = tmp_path_factory.mktemp("shell")
    train = [str(BIN / "rsrefseg"), "train", "--config", str(REPO / "configs/demo.yaml"),
             f"data.path={prepared_dataset}", "train.figure_samples=0", "train.log_every_n_steps=1"]
    # demo.yaml would start a 4-CPU Ray (cluster.num_cpus); the running one has 2, which two 1-CPU
    # workers would fill, leaving Ray Data none: a clear refusal, no traceback. Half a CPU each fits.
    plain_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    short = ["train.epochs=50", "data.limit=16", "train.batch_size=4"]  # short epochs, many of them
    runs = {}
    for name, sig, env, extra, waits_for in (
        ("refused", None, local_head_env, ["train.epochs=1"], ""),
        ("ctrl-c", signal.SIGINT, local_head_env, [*short, "train.cpus_per_worker=0.5", "--verbose"],
         "Reporting training result"),
        ("stop", signal.SIGTERM, plain_env, short, ""),
    ):
        home = tmp / name
        home.mkdir()
        out, err = open(home / "stdout.log", "w"), open(home / "stderr.log", "w")
        proc = subprocess.Popen([*train, *extra], cwd=home, env={**env, "RSREFSEG_HOME": str(home)},
                                stdout=out, stderr=err, text=True)
        runs[name] = (home, sig, proc, (out, err), waits_for)
    try:
        runs["refused"][2].wait(timeout=300)
        # Into the training proper: an epoch trained and validated in each of the others.
        deadline = time.monotonic() + 400
        running = [run for name, run in runs.items() if name != "refused"]
        while not all(_ready(home, waits) for home, _, _, _, waits in running) and time.monotonic() < deadline:
            assert all(proc.poll() is None for _, _, proc, _, _ in running), "a run ended early"
            time.sleep(1)
        assert all(_ready(home, waits) for home, _, _, _, waits in running), "a run never finished an epoch"
        for _, sig, proc, _, _ in running:
            proc.send_signal(sig)
        for _, _, proc, _, _ in running:
            proc.wait(timeout=240)
    finally:
        for _, _, proc, _, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
    ended = {}
    for name, (home, sig, proc, files, _) in runs.items():
        for f in files:
            f.close()
        out, err = (home / "stdout.log").read_text(), (home / "stderr.log").read_text()
        ended[name] = ShellRun(home, sig, proc.returncode, out + err, err)
    return ended


def test_a_run_beside_ray_start_joins_it_and_runs_end_honestly_on_ctrl_c_or_stop(shell_runs):
    refused = shell_runs["refused"]
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "joining the Ray already running on this machine" in refused.stderr
    assert "of the 2 CPUs of the Ray already running on this machine" in refused.stderr
    assert "Traceback" not in refused.stderr
    for name in ("ctrl-c", "stop"):
        run = shell_runs[name]
        # Ctrl-C exits 130. After SIGTERM, Ray's own C++ signal handler ends the process (SIGABRT)
        # once the run is closed; what a stopped job needs is the MLflow state and the log line.
        assert run.returncode == 130 if run.signal == signal.SIGINT else run.returncode != 0, run.stderr[-3000:]
        assert "was interrupted" in run.stderr and "rsrefseg train --resume" in run.stderr, run.stderr[-3000:]
        ((_, status),) = _run_status(run.home)
        assert status == "KILLED", (name, status)
    # The one beside `ray start` trained on that Ray, not on one of its own.
    assert "joining the Ray already running on this machine" in shell_runs["ctrl-c"].stderr
    assert "joining" not in shell_runs["stop"].stderr


def test_train_speaks_in_the_platform_s_voice_and_keeps_ray_s_in_its_log(shell_runs):
    quiet = shell_runs["stop"]
    log = quiet.log()
    assert log.parent == quiet.home / "logs" and log.is_file()
    assert re.search(r"\[rsrefseg\] epoch 1/50 step \d+/\d+ loss [\d.]+ .* samples/s ETA ", quiet.printed)
    assert re.search(r"\[rsrefseg\] epoch 1/50 validation: .*gIoU [\d.]+", quiet.printed)
    for chatter in RAY_CHATTER:
        assert chatter not in quiet.printed, chatter
    logged = log.read_text()
    for chatter in ("Reporting training result", "TrainingReport(", "Checkpoint successfully created",
                    "Execution plan of Dataset", "Started a local Ray instance"):
        assert chatter in logged, chatter

    verbose = shell_runs["ctrl-c"]
    assert "[rsrefseg] epoch 1/50 validation:" in verbose.printed
    assert "Reporting training result" in verbose.printed and "Execution plan of Dataset" in verbose.printed
    assert "Reporting training result" in verbose.log().read_text()
    print(f"console lines: {len(quiet.printed.splitlines())} by default, {len(verbose.printed.splitlines())} "
          "with --verbose")
