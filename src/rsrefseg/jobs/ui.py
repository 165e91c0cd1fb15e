"""`rsrefseg ui` and `rsrefseg mlflow-server`: the MLflow UI and a tracking server for clusters."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from rsrefseg.platform import tracking
from rsrefseg.platform.config import ConfigError, TrackingConfig

SERVER_WORKERS = 4  # MLflow's own default for `mlflow server --workers`


def ui_command(*, host: str, port: int, tracking_uri: str | None) -> list[str]:
    uri = tracking_uri or tracking.resolve_tracking_uri(TrackingConfig())
    if uri.startswith(("http://", "https://")):
        # A tracking server already serves the UI; nothing to start.
        return []
    # One user's browser: one worker process (MLflow's default of 4 start 4 copies of its server).
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def run_ui(*, host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None) -> int:
    cmd = ui_command(host=host, port=port, tracking_uri=tracking_uri)
    if not cmd:
        print(f"[rsrefseg] {tracking_uri} is an MLflow server: open it in a browser "
              "(through `ssh -L` or `ray dashboard` port forwarding for a cluster).")
        return 0
    print(f"[rsrefseg] MLflow UI on http://{host}:{port} (Ctrl-C to stop)", flush=True)
    return subprocess.call(cmd)


def server_command(
    *, host: str, port: int, backend_store_uri: str, artifacts_destination: str, allowed_hosts: str = "",
    workers: int = SERVER_WORKERS,
) -> list[str]:
    backend = backend_store_uri or tracking.resolve_tracking_uri(TrackingConfig())
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
    cmd = server_command(host=host, port=port, backend_store_uri=backend_store_uri,
                         artifacts_destination=artifacts_destination, allowed_hosts=allowed_hosts, workers=workers)
    print(f"[rsrefseg] MLflow server listening on {host}:{port}; clients set tracking.uri={client_uri(host, port)} "
          "(or another address of this host: then add it to --allowed-hosts)", flush=True)
    return subprocess.call(cmd)
