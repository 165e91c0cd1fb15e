"""`rsrefseg ui`: the MLflow UI on the project-local store, reachable on loopback only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from rsrefseg.cli import main
from rsrefseg.platform import tracking
from rsrefseg.platform.config import TrackingConfig
from tests.models.helpers import tiny_config
from tests.network import free_port, wait_http

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_ui_serves_the_project_store_on_loopback_only(project_home):
    # A run in the project-local store (the default tracking location).
    cfg = tiny_config(["tracking.experiment=ui-check"])
    run_id = tracking.start_run(cfg, run_name="seen-in-the-ui")
    assert tracking.resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{project_home / 'mlflow.db'}"

    port = free_port()
    proc = subprocess.Popen([str(BIN / "rsrefseg"), "ui", "--port", str(port)], cwd=project_home,
                            env={**os.environ, "RSREFSEG_HOME": str(project_home)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert json.load(resp)["run"]["info"]["run_name"] == "seen-in-the-ui"
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        listening = {c.laddr.ip for p in tree for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}  # not 0.0.0.0: the UI is not exposed by default
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_ui_on_a_server_uri_starts_nothing(capsys):
    assert main(["ui", "--tracking-uri", "http://head:5000"]) == 0
    assert "is an MLflow server" in capsys.readouterr().out
