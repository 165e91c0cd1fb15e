"""Loopback helpers of the tests that start servers (Ray cluster, MLflow)."""

from __future__ import annotations

import os
import socket
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, headers: dict | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def kill_tree_using(marker: str) -> None:
    """Kill every process whose command line mentions `marker` (a Ray's own temp dir), and their
    descendants: raylets start agents and workers that retitle themselves `ray::...`. Unlike
    `ray stop`, this leaves every other Ray on the machine alone."""
    import psutil

    doomed: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or []):
            doomed[proc.pid] = proc
            try:
                doomed.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    for proc in doomed.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def train_worker_pids() -> list[int]:
    """Pids of live Ray Train worker processes on this machine (Ray titles them `ray::RayTrainWorker...`)."""
    import subprocess

    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::RayTrainWorker" in line]
