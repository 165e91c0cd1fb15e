"""`rsrefseg ui` and `rsrefseg mlflow-server`: the MLflow UI and a tracking server for clusters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from rsrefseg.platform import paths, storage, tracking
from rsrefseg.platform.config import TrackingConfig
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError

SERVER_WORKERS = 4  # MLflow's own default for `mlflow server --workers`
# MLflow's own S3 endpoint variable: when set, its S3 artifact store passes it to boto3 as
# endpoint_url, over boto3's own AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (which botocore reads
# by itself when MLflow passes none).
MLFLOW_S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"


def ui_command(*, host: str, port: int, tracking_uri: str | None) -> list[str]:
    uri = tracking_uri or paths.tracking_uri(TrackingConfig())
    if uri.startswith(("http://", "https://")):
        # A tracking server already serves the UI; nothing to start.
        return []
    # One user's browser: one worker process (MLflow's default of 4 start 4 copies of its server).
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def run_ui(*, host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None) -> int:
    cmd = ui_command(host=host, port=port, tracking_uri=tracking_uri)
    if not cmd:
        say(f"{tracking_uri} is an MLflow server: open it in a browser "
            "(through `ssh -L` or `ray dashboard` port forwarding for a cluster).")
        return 0
    say(f"MLflow UI on http://{host}:{port} (Ctrl-C to stop)")
    return subprocess.call(cmd)


def server_command(
    *, host: str, port: int, backend_store_uri: str, artifacts_destination: str, allowed_hosts: str = "",
    workers: int = SERVER_WORKERS,
) -> list[str]:
    backend = backend_store_uri or paths.tracking_uri(TrackingConfig())
    artifacts = artifacts_destination or (tracking.project_root() / "mlartifacts").as_uri()
    if "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        # Clients upload artifacts through the server (--serve-artifacts), so workers need no
        # access to the artifact root themselves.
        "--serve-artifacts", "--artifacts-destination", artifacts,
        "--host", host, "--port", str(port), "--workers", str(workers),
        # MLflow 3 answers only Host headers it admits (localhost and private ranges by default,
        # against DNS rebinding): clients that reach this host by another name or address need it.
        *(["--allowed-hosts", allowed_hosts] if allowed_hosts else []),
    ]


def check_port_free(host: str, port: int) -> None:
    """Fail with a clear message when host:port is taken (MLflow's server would print the bind
    error and still exit 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the server's own socket does: a port left in TIME_WAIT by a server just stopped is
        # free to listen on; one with a listener still fails on Linux.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); another server "
                f"(an MLflow server already running?) holds it: stop it or choose another --port"
            ) from None


def server_environment(environ=os.environ) -> dict[str, str]:
    """The server's environment, with one S3 endpoint for its artifact store and our checks.

    MLflow's S3 store passes MLFLOW_S3_ENDPOINT_URL to boto3 when set; without it boto3 reads
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself, as `storage` does. Either one set alone is
    the endpoint for both; the two naming different endpoints is refused."""
    env = dict(environ)
    ours, mlflows = storage.endpoint_url(env), env.get(MLFLOW_S3_ENDPOINT_ENV, "")
    if ours and mlflows and ours.rstrip("/") != mlflows.rstrip("/"):
        raise ConfigError(
            f"{MLFLOW_S3_ENDPOINT_ENV}={mlflows} and AWS_ENDPOINT_URL(_S3)={ours} name different S3 endpoints: "
            "the server would write artifacts to one and rsrefseg check the other; unset one of them")
    if mlflows and not ours:
        env[storage.ENDPOINT_ENVS[1]] = mlflows
    return env


def check_artifacts_writable(destination: str) -> None:
    """Fail, naming --artifacts-destination, the URI and what S3 answered, unless this machine can
    write under an s3:// destination: MLflow's server would start, and fail every upload later.
    A local folder (the default) needs no probe: the server creates it."""
    if urlparse(destination).scheme == "s3":
        storage.check_writable("--artifacts-destination", destination)


def client_uri(host: str, port: int) -> str:
    """The tracking.uri clients should use: a listen-on-all address is no address to connect to."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{port}"


def run_mlflow_server(
    *, host: str, port: int, backend_store_uri: str = "", artifacts_destination: str = "", allowed_hosts: str = "",
    workers: int = SERVER_WORKERS,
) -> int:
    check_port_free(host, port)
    env = server_environment()
    # This command only launches the server: its endpoint is the server's (storage reads os.environ).
    os.environ.update(env)
    check_artifacts_writable(artifacts_destination)
    cmd = server_command(host=host, port=port, backend_store_uri=backend_store_uri,
                         artifacts_destination=artifacts_destination, allowed_hosts=allowed_hosts, workers=workers)
    say(f"MLflow server listening on {host}:{port}; clients set tracking.uri={client_uri(host, port)} "
        "(or another address of this host: then add it to --allowed-hosts)")
    return subprocess.call(cmd, env=env)
