"""`rsrefseg ui` and `rsrefseg mlflow-server`: the MLflow UI and a tracking server for clusters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rsrefseg.platform import tracking
from rsrefseg.platform.config import TrackingConfig


def ui_command(*, host: str, port: int, tracking_uri: str | None) -> list[str]:
    uri = tracking_uri or tracking.resolve_tracking_uri(TrackingConfig())
    if uri.startswith(("http://", "https://")):
        # A tracking server already serves the UI; nothing to start.
        return []
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def run_ui(*, host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None) -> int:
    cmd = ui_command(host=host, port=port, tracking_uri=tracking_uri)
    if not cmd:
        print(f"[rsrefseg] {tracking_uri} is an MLflow server: open it in a browser "
              "(through `ssh -L` or `ray dashboard` port forwarding for a cluster).")
        return 0
    print(f"[rsrefseg] MLflow UI on http://{host}:{port} (Ctrl-C to stop)", flush=True)
    return subprocess.call(cmd)


def server_command(*, host: str, port: int, backend_store_uri: str, artifacts_destination: str) -> list[str]:
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
        "--host", host, "--port", str(port),
    ]


def run_mlflow_server(*, host: str, port: int, backend_store_uri: str = "", artifacts_destination: str = "") -> int:
    cmd = server_command(host=host, port=port, backend_store_uri=backend_store_uri,
                         artifacts_destination=artifacts_destination)
    print(f"[rsrefseg] MLflow server on http://{host}:{port}; set tracking.uri=http://{host}:{port}", flush=True)
    return subprocess.call(cmd)
