"""`rsrefseg ui`: the MLflow UI on the project-local store, reachable on loopback only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from rsrefseg.cli import main
from rsrefseg.platform import paths, tracking
from rsrefseg.platform.config import TrackingConfig
from tests.models.helpers import tiny_config
from tests.network import free_port, wait_http

BIN = Path(sys.executable).parent


def test_ui_on_a_server_uri_starts_nothing(capsys):
    assert main(["ui", "--tracking-uri", "http://head:5000"]) == 0
    assert "is an MLflow server" in capsys.readouterr().out


def test_mlflow_server_on_a_taken_port_fails_instead_of_exiting_0(project_home, capsys):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert main(["mlflow-server", "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


def test_the_printed_tracking_uri_is_an_address_clients_can_reach():
    from rsrefseg.jobs.ui import client_uri

    assert client_uri("0.0.0.0", 5000) == f"http://{socket.gethostname()}:5000"
    assert client_uri("::", 5000) == f"http://{socket.gethostname()}:5000"
    assert client_uri("10.0.0.5", 5001) == "http://10.0.0.5:5001"


def test_the_server_keeps_artifacts_in_the_project_by_default(project_home):
    from rsrefseg.jobs.ui import server_command

    cmd = server_command(host="127.0.0.1", port=5000, backend_store_uri="", artifacts_destination="")
    assert cmd[cmd.index("--artifacts-destination") + 1] == (project_home / "mlartifacts").as_uri()
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{project_home / 'mlflow.db'}"
    assert "--app-name" not in cmd  # no --auth: MLflow's own app


def _status_with_host(port: int, host_header: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers={"Host": host_header})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_ui_on_loopback_and_a_server_that_answers_the_hosts_it_is_told_to_allow(project_home):
    # Both servers start side by side (each takes seconds of CPU to come up).
    # `rsrefseg ui`: the project-local store (the default tracking location), on loopback only.
    cfg = tiny_config(["tracking.experiment=ui-check"])
    run_id = tracking.create_run(cfg, run_name="seen-in-the-ui")
    assert paths.tracking_uri(TrackingConfig()) == f"sqlite:///{project_home / 'mlflow.db'}"
    env = {**os.environ, "RSREFSEG_HOME": str(project_home)}
    ui_port, server_port = free_port(), free_port()
    ui = subprocess.Popen([str(BIN / "rsrefseg"), "ui", "--port", str(ui_port)], cwd=project_home, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # `rsrefseg mlflow-server`: MLflow 3 refuses Host headers outside localhost and the private
    # ranges (DNS-rebinding protection); a client that reaches the head by a public name needs
    # --allowed-hosts.
    server_store = project_home / "server"
    server_store.mkdir()
    server = subprocess.Popen(
        [str(BIN / "rsrefseg"), "mlflow-server", "--host", "127.0.0.1", "--port", str(server_port),
         "--backend-store-uri", f"sqlite:///{server_store / 'mlflow.db'}", "--artifacts-destination",
         str(server_store / "art"), "--workers", "1", "--allowed-hosts",
         f"mlflow.rsrefseg.example:{server_port},localhost:{server_port},127.0.0.1:{server_port}"],
        cwd=project_home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{ui_port}/health", timeout=120)
        url = f"http://127.0.0.1:{ui_port}/api/2.0/mlflow/runs/get?run_id={run_id}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert json.load(resp)["run"]["info"]["run_name"] == "seen-in-the-ui"
        tree = [psutil.Process(ui.pid), *psutil.Process(ui.pid).children(recursive=True)]
        listening = {c.laddr.ip for p in tree for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == ui_port}
        assert listening == {"127.0.0.1"}  # not 0.0.0.0: the UI is not exposed by default

        wait_http(f"http://127.0.0.1:{server_port}/health", timeout=120)
        assert _status_with_host(server_port, f"mlflow.rsrefseg.example:{server_port}") == 200
        assert _status_with_host(server_port, f"other.rsrefseg.example:{server_port}") == 403
    finally:
        # SIGTERM to each command alone ends all it started (tests/jobs/test_server_processes.py).
        for proc in (ui, server):
            os.kill(proc.pid, signal.SIGTERM)
        for proc in (ui, server):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


