"""`rsrefseg train` from a shell, as a user reads it: the platform's progress on the console, Ray's
own output (Ray Data's progress bars and execution notices, Ray Train's per-rank reports) in the
log file the run names, and back on the console with --verbose."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

RAY_CHATTER = ("Reporting training result", "TrainingReport(", "Checkpoint successfully created",
               "Execution plan of Dataset", "row/s]")


def train(prepared: Path, home: Path, *extra: str) -> tuple[str, Path]:
    """One tiny epoch in a fresh process (its own local Ray): (console output, the log file it names)."""
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RSREFSEG_HOME=str(home), PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [str(BIN / "rsrefseg"), "train", "--config", str(REPO / "configs/demo.yaml"), f"data.path={prepared}",
         "train.epochs=1", "data.limit=16", "train.batch_size=4", "train.log_every_n_steps=1",
         "train.figure_samples=0", f"tracking.uri=sqlite:///{home / 'mlflow.db'}",
         f"train.storage_path={home / 'runs'}", *extra],
        cwd=home, env=env, capture_output=True, text=True, timeout=480)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-5000:]
    (log,) = re.findall(r"^\[rsrefseg\] log: (\S+)", done.stdout, re.M)
    return printed, Path(log)


@pytest.mark.timeout(900)
def test_train_speaks_in_the_platform_s_voice_and_keeps_ray_s_in_its_log(prepared_dataset, tmp_path):
    printed, log = train(prepared_dataset, tmp_path / "quiet")
    assert log.parent == tmp_path / "quiet" / "logs" and log.is_file()
    assert re.search(r"\[rsrefseg\] epoch 1/1 step \d+/\d+ loss [\d.]+ .* samples/s ETA ", printed)
    assert re.search(r"\[rsrefseg\] epoch 1/1 validation: .*gIoU [\d.]+", printed)
    assert "[rsrefseg] best checkpoint (epoch 1" in printed
    for chatter in RAY_CHATTER:
        assert chatter not in printed, chatter
    logged = log.read_text()
    for chatter in ("Reporting training result", "TrainingReport(", "Checkpoint successfully created",
                    "Execution plan of Dataset", "Started a local Ray instance"):
        assert chatter in logged, chatter
    quiet_lines = len(printed.splitlines())

    printed, log = train(prepared_dataset, tmp_path / "verbose", "--verbose")
    assert "[rsrefseg] epoch 1/1 validation:" in printed
    assert "Reporting training result" in printed and "Execution plan of Dataset" in printed
    assert "Reporting training result" in log.read_text()
    print(f"console lines: {quiet_lines} by default, {len(printed.splitlines())} with --verbose")
