"""`rsrefseg mlflow-server --auth`: MLflow's basic-auth app, its admin from the server's
environment (never the command line or a file in the project), clients signing in with
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; without credentials a request is refused."""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from rsrefseg.cli import main
from tests.network import free_port, wait_http

BIN = Path(sys.executable).parent
ADMIN, PASSWORD = "rsrefseg-admin", "correct-horse-battery-staple"
AUTH_ENVS = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_USERNAME",
             "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY")


@pytest.fixture
def no_auth_env(monkeypatch):
    for name in AUTH_ENVS:
        monkeypatch.delenv(name, raising=False)


def test_auth_without_the_admins_credentials_refuses_to_start(project_home, no_auth_env, monkeypatch, capsys):
    port = str(free_port())
    assert main(["mlflow-server", "--auth", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "--auth: set MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD" in err
    assert len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "short")
    assert main(["mlflow-server", "--auth", "--port", port]) == 2
    assert "shorter than MLflow's minimum of 12" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", PASSWORD)
    assert main(["mlflow-server", "--auth", "--port", port, "--backend-store-uri", "postgresql://db/mlflow"]) == 2
    assert "--auth-database-uri" in capsys.readouterr().err


def test_the_command_line_carries_no_credential_and_the_auth_config_is_private(tmp_path):
    from rsrefseg.jobs.ui import auth_config, auth_database, server_command

    backend = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cmd = server_command(host="127.0.0.1", port=5000, backend_store_uri=backend, artifacts_destination="s3://b/a",
                         auth=True)
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert not any(PASSWORD in part or ADMIN in part for part in cmd)
    database = auth_database(backend)
    assert database == f"sqlite:///{tmp_path / 'store' / 'basic_auth.db'}"  # beside the backend store
    env = {"MLFLOW_AUTH_ADMIN_USERNAME": ADMIN, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD}
    with auth_config(env, database) as ini:
        assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(ini)
        assert stat.S_IMODE(ini.stat().st_mode) == 0o600
        assert stat.S_IMODE(ini.parent.stat().st_mode) == 0o700
        text = ini.read_text()
        assert f"database_uri = {database}" in text and PASSWORD not in text and "admin_password" not in text
        assert len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) >= 32
    assert not ini.parent.exists()


def test_a_submitted_job_does_not_carry_the_tracking_password(monkeypatch):
    """The nodes have their own credentials (cluster.yaml); the job's runtime env never copies them."""
    from rsrefseg.jobs.submit import runtime_env

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert PASSWORD not in repr(runtime_env())


def _status(url: str, user: str = "", password: str = "") -> int:
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _server_config_path(pid: int) -> Path:
    for proc in psutil.Process(pid).children(recursive=True):
        with_config = proc.environ().get("MLFLOW_AUTH_CONFIG_PATH")
        if with_config:
            return Path(with_config)
    raise AssertionError("no MLflow process with MLFLOW_AUTH_CONFIG_PATH")


@pytest.mark.slow
def test_an_authenticated_server_refuses_anonymous_clients_and_serves_signed_in_ones(
        project_home, no_auth_env, monkeypatch):
    from mlflow.tracking import MlflowClient

    port = free_port()
    store = project_home / "server"
    env = {**os.environ, "RSREFSEG_HOME": str(project_home), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
           "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD}
    server = subprocess.Popen(
        [str(BIN / "rsrefseg"), "mlflow-server", "--auth", "--host", "127.0.0.1", "--port", str(port), "--workers",
         "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "art")],
        cwd=project_home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    search, ini = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", None
    try:
        wait_http(f"{uri}/health", timeout=120)
        assert _status(search) == 401  # no credentials
        assert _status(search, ADMIN, "not-the-password") == 401
        assert _status(search, ADMIN, PASSWORD) == 200

        # The MLflow client (as a train job on the cluster): credentials from its environment.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("auth-check"))
        client.log_metric(run.info.run_id, "gIoU", 61.5)
        assert client.get_run(run.info.run_id).data.metrics == {"gIoU": 61.5}

        # The password is on no process's command line; the users' database is beside the store;
        # MLflow's auth config is private to this user and holds no credential.
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        assert not [p.pid for p in tree if PASSWORD in " ".join(p.cmdline())]
        assert (store / "basic_auth.db").is_file()
        ini = _server_config_path(server.pid)
        assert stat.S_IMODE(ini.stat().st_mode) == 0o600 and PASSWORD not in ini.read_text()
    finally:
        os.kill(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=30)[0].decode(errors="replace")
    assert server.returncode == 0, output[-3000:]
    assert ini is not None and not ini.parent.exists()  # removed with the server
