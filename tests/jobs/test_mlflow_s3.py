"""`rsrefseg mlflow-server --artifacts-destination s3://...`: artifacts in object storage, reached
through the server, so a client needs only its URL and no S3 credentials (MLflow's client then
streams a file through the server, or fetches it from the store by a URL the server signs); a
destination this machine cannot write is refused before any server starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsrefseg.cli import main
from rsrefseg.platform import storage
from tests.network import free_port, wait_http

BIN = Path(sys.executable).parent
CREDENTIAL_ENVS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")


def _server(port: int, store: Path, destination: str) -> list[str]:
    return [str(BIN / "rsrefseg"), "mlflow-server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", destination,
            "--workers", "1"]


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_server_keeps_figures_tables_and_models_in_s3_and_serves_them_to_a_client_without_credentials(
        s3_server, s3_bucket, tiny_checkpoint, tmp_path, monkeypatch):
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    port = free_port()
    # The server gets the machine's AWS settings (the session's: AWS_ENDPOINT_URL, admin's keys,
    # no MLFLOW_S3_ENDPOINT_URL: boto3 finds the endpoint by itself).
    server_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_S3_ENDPOINT_URL"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(_server(port, tmp_path, f"s3://{s3_bucket}/mlartifacts"), cwd=tmp_path,
                              env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The client: this process with no AWS credentials and no endpoint at all.
        for key in (*CREDENTIAL_ENVS, *ENDPOINT_ENVS):
            monkeypatch.delenv(key, raising=False)
        assert not storage.has_credentials()
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        uri = f"http://127.0.0.1:{port}"

        # A model, by the project's own path (checkpoint + pyfunc, registered).
        assert main(["register", "--checkpoint", str(tiny_checkpoint), "--name", "rsrefseg-s3",
                     f"tracking.uri={uri}", "tracking.experiment=s3-artifacts"]) == 0
        client = MlflowClient(uri)
        version = client.get_model_version("rsrefseg-s3", "1")
        # MLflow 3: the version's source is the logged model (models:/m-...), whose artifacts hold the checkpoint.
        model = client.get_logged_model(version.source.removeprefix("models:/"))

        # A figure and a table in a run of their own.
        run = client.create_run(client.get_experiment_by_name("s3-artifacts").experiment_id)
        run_id, exp_id = run.info.run_id, run.info.experiment_id
        figure = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        client.log_image(run_id, figure, artifact_file="val_predictions/epoch_001.png")
        client.log_table(run_id, {"split": ["val", "test"], "gIoU": [61.5, 60.25]}, artifact_file="metrics/table.json")
        client.set_terminated(run_id)

        # Objects in the bucket, under the destination's prefix, where MLflow lays them out.
        keys = s3_server.keys(s3_bucket, "mlartifacts/")
        run_prefix = f"mlartifacts/{exp_id}/{run_id}/artifacts"
        assert f"{run_prefix}/val_predictions/epoch_001.png" in keys, keys
        assert f"{run_prefix}/metrics/table.json" in keys, keys
        assert model.artifact_location.startswith("mlflow-artifacts:/"), model.artifact_location
        model_prefix = "mlartifacts/" + model.artifact_location.removeprefix("mlflow-artifacts:/").strip("/")
        model_keys = {k.removeprefix(model_prefix + "/") for k in keys if k.startswith(model_prefix + "/")}
        assert {"MLmodel", "artifacts/best/weights.safetensors", "artifacts/best/config.yaml"} <= model_keys, keys

        assert [a.path for a in client.list_artifacts(run_id, "val_predictions")] == ["val_predictions/epoch_001.png"]
        stored = s3_server.read(s3_bucket, f"{run_prefix}/val_predictions/epoch_001.png")

        # MLflow >= 3.17's Python client fetches a file straight from the store, by a URL the
        # server signs with its own keys: the client needs to reach the endpoint, never a key.
        presigned = json.loads(urllib.request.urlopen(
            f"{uri}/api/2.0/mlflow-artifacts/presigned/{exp_id}/{run_id}/artifacts/val_predictions/epoch_001.png",
            timeout=30).read())
        assert presigned["url"].startswith(f"{s3_server.endpoint}/{s3_bucket}/{run_prefix}/val_predictions/epoch_001.png?")
        assert "X-Amz-Signature=" in presigned["url"] and presigned["file_size"] == len(stored)
        # moto checks only header-signed requests, so the downloads below take the path the UI
        # takes and a client that cannot reach the store takes: streamed through the server.
        monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
        png = Path(client.download_artifacts(run_id, "val_predictions/epoch_001.png", str(tmp_path / "dl")))
        assert png.read_bytes() == stored
        np.testing.assert_array_equal(np.asarray(Image.open(png)), figure)
        table = json.loads(Path(client.download_artifacts(run_id, "metrics/table.json", str(tmp_path / "dl"))).read_text())
        assert table["columns"] == ["split", "gIoU"] and table["data"] == [["val", 61.5], ["test", 60.25]]
        # The registered version's files (by its download URI: `models:/` resolves against the
        # process's registry URI, not the tracking_uri passed here).
        source = client.get_model_version_download_uri("rsrefseg-s3", "1")
        local = Path(download_artifacts(artifact_uri=source, tracking_uri=uri, dst_path=str(tmp_path / "model")))
        (weights,) = local.rglob("weights.safetensors")
        assert weights.read_bytes() == (tiny_checkpoint / "weights.safetensors").read_bytes()
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        log.close()


def test_mlflows_own_endpoint_variable_names_the_store_for_the_server_and_the_probe(s3_server, s3_bucket, monkeypatch):
    from rsrefseg.jobs.ui import check_artifacts_writable, server_environment
    from rsrefseg.platform.errors import ConfigError

    # Only MLFLOW_S3_ENDPOINT_URL names the store (as MLflow's docs for MinIO say): the server's
    # environment then names it for boto3 and for our probe alike, and the probe reaches it.
    environ = {k: v for k, v in os.environ.items() if k not in ENDPOINT_ENVS}
    env = server_environment({**environ, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint})
    assert storage.endpoint_url(env) == s3_server.endpoint
    for key in ENDPOINT_ENVS:  # this process as `rsrefseg mlflow-server` sets it up
        monkeypatch.delenv(key, raising=False)
        if env.get(key):
            monkeypatch.setenv(key, env[key])
    check_artifacts_writable(f"s3://{s3_bucket}/mlartifacts")
    # The probe leaves no object behind (pyarrow may keep the prefix as an empty folder marker).
    assert [k for k in s3_server.keys(s3_bucket) if not k.endswith("/")] == []
    check_artifacts_writable(str(Path("/nonexistent/mlartifacts")))  # a local folder: the server creates it

    # The same endpoint twice is one endpoint; two different ones are refused, naming both.
    same = server_environment({**environ, "AWS_ENDPOINT_URL": s3_server.endpoint,
                               "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint + "/"})
    assert storage.endpoint_url(same) == s3_server.endpoint
    with pytest.raises(ConfigError, match="MLFLOW_S3_ENDPOINT_URL=http://10.0.0.9:9000 and AWS_ENDPOINT_URL"):
        server_environment({**environ, "AWS_ENDPOINT_URL": s3_server.endpoint,
                            "MLFLOW_S3_ENDPOINT_URL": "http://10.0.0.9:9000"})


def test_a_destination_this_machine_cannot_write_is_refused_before_any_server_starts(s3_server, s3_bucket, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    no_credentials = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENVS}
    ours = f"s3://{s3_bucket}/mlartifacts"
    cases = [  # (what, env (None: no credentials; a None value: unset), destination, what it says)
        ("missing bucket", {}, "s3://rsr-no-such-bucket/mlartifacts", ["NO_SUCH_BUCKET", s3_server.endpoint]),
        ("read-only keys", s3_server.env(s3_server.reader), ours, ["ACCESS_DENIED", s3_server.endpoint]),
        ("nothing listening", {"AWS_ENDPOINT_URL": dead}, ours, ["NETWORK_CONNECTION", dead]),
        # MLflow's variable alone names the server's endpoint: the probe goes there too.
        ("MLflow's endpoint", {"MLFLOW_S3_ENDPOINT_URL": dead, "AWS_ENDPOINT_URL": None}, ours,
         ["NETWORK_CONNECTION", dead]),
        ("no credentials", None, ours, ["no AWS credentials found"]),
    ]
    # All at once: a dead endpoint takes pyarrow's retries (seconds) to give up.
    started, procs = time.monotonic(), []
    for what, extra, destination, _ in cases:
        env = no_credentials if extra is None else {**os.environ, **extra}
        env = {k: v for k, v in env.items() if v is not None}
        port = free_port()
        procs.append((port, subprocess.Popen(_server(port, tmp_path, destination), cwd=tmp_path, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             start_new_session=True)))
    try:
        for (what, _, destination, says), (port, proc) in zip(cases, procs):
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 2, (what, out, err)
            assert len(err.strip().splitlines()) == 1, (what, err)
            assert all(part in err for part in ["--artifacts-destination", destination, *says]), (what, err)
            assert "listening" not in out and _port_is_free(port), what
        assert time.monotonic() - started < 60
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert not (tmp_path / "mlflow.db").exists()  # no server ever opened the store
