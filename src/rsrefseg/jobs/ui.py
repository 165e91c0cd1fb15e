"""`rsrefseg ui` and `rsrefseg mlflow-server`: the MLflow UI and a tracking server for clusters.

Each command owns the processes it starts. MLflow's server is a tree (the `mlflow` command, its
uvicorn server and workers, a job runner and its huey consumers); it runs in a process group of
its own, and SIGTERM, SIGINT or SIGHUP to the command (`kill`, a supervisor's stop, Ctrl-C, a
closed terminal), or the command ending any other way, ends that whole tree and frees the port:
SIGTERM to every process of it, SIGKILL to what is left after STOP_GRACE_S. Should the command
itself be killed outright (SIGKILL), the kernel sends the `mlflow` command SIGTERM (Linux's
parent-death signal), which then stops its server.

`mlflow-server --auth` runs MLflow's basic-auth app: every request needs a user's password
(clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), and the admin user is created
on the first start from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD in the server's
environment, never from the command line (`ps` shows it to every user) or a file in the project.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from rsrefseg.platform import paths, signals, storage
from rsrefseg.platform.config import TrackingConfig
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError, UserError

SERVER_WORKERS = 4  # MLflow's own default for `mlflow server --workers`
# MLflow's own S3 endpoint variable: when set, its S3 artifact store passes it to boto3 as
# endpoint_url, over boto3's own AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (which botocore reads
# by itself when MLflow passes none).
MLFLOW_S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 4.0  # after SIGTERM, the server's processes have this long before SIGKILL
# MLflow's basic-auth app: the admin it creates on its first start (MLflow's own variables, read
# by the server from its environment), the key its CSRF protection signs with, its config file.
ADMIN_ENVS = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
AUTH_DB_NAME = "basic_auth.db"  # beside a SQLite backend store
MIN_PASSWORD = 12  # MLflow's own rule for a user's password
AUTH_DEFAULT_PERMISSION = "READ"  # MLflow's default: a signed-in user reads what others made, writes their own
# MLflow checks a password by a deliberately slow hash on every request; a training run logs many
# times a minute, so each server process remembers a password it accepted for this long (MLflow's
# auth cache; a changed or deleted password may then still work that long on another process).
AUTH_CACHE_TTL_S = 60


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
    return run_owned(cmd, name="MLflow UI")


def server_command(
    *, host: str, port: int, backend_store_uri: str, artifacts_destination: str, allowed_hosts: str = "",
    workers: int = SERVER_WORKERS, auth: bool = False,
) -> list[str]:
    backend = backend_store_uri or paths.tracking_uri(TrackingConfig())
    artifacts = artifacts_destination or (paths.project_root() / "mlartifacts").as_uri()
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
        # Users and passwords (auth_config): the credentials are in the environment, not here.
        *(["--app-name", "basic-auth"] if auth else []),
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
    workers: int = SERVER_WORKERS, auth: bool = False, auth_database_uri: str = "",
) -> int:
    env = server_environment()
    backend = backend_store_uri or paths.tracking_uri(TrackingConfig())
    if auth:
        check_auth_settings(env)
        auth_database_uri = auth_database(backend, auth_database_uri)
    check_port_free(host, port)
    # This command only launches the server: its endpoint is the server's (storage reads os.environ).
    os.environ.update(env)
    check_artifacts_writable(artifacts_destination)
    cmd = server_command(host=host, port=port, backend_store_uri=backend, artifacts_destination=artifacts_destination,
                         allowed_hosts=allowed_hosts, workers=workers, auth=auth)
    with auth_config(env, auth_database_uri) if auth else contextlib.nullcontext():
        say(f"MLflow server listening on {host}:{port}; clients set tracking.uri={client_uri(host, port)} "
            "(or another address of this host: then add it to --allowed-hosts)")
        if auth:
            say(f"users sign in (users' database: {paths.redact(auth_database_uri)}); clients set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in their environment")
        return run_owned(cmd, env=env, name="MLflow server")


# --- `--auth`: MLflow's basic-auth app ---------------------------------------------------------


def check_auth_settings(environ=os.environ) -> None:
    """The admin's name and password are in the server's environment, and MLflow's auth app is
    installed: else one line saying what to set (MLflow itself would fail with a traceback)."""
    import importlib.util

    missing = [name for name in ADMIN_ENVS if not environ.get(name, "").strip()]
    if missing:
        raise UserError(
            f"--auth: set {' and '.join(missing)} in the server's environment (the admin user MLflow creates "
            "on its first start; never on the command line, where `ps` shows it); clients sign in with "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if len(environ[ADMIN_ENVS[1]]) < MIN_PASSWORD:
        raise UserError(f"--auth: {ADMIN_ENVS[1]} is shorter than MLflow's minimum of {MIN_PASSWORD} characters")
    if importlib.util.find_spec("flask_wtf") is None:
        raise UserError("--auth: MLflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'")


def auth_database(backend_store_uri: str, given: str = "") -> str:
    """Where the users and their permissions live: `given`, else basic_auth.db beside a SQLite store."""
    if given:
        return given
    db = paths.sqlite_file(backend_store_uri)  # sqlite:///relative or sqlite:////absolute
    if db is not None:
        store = Path(db.split("?")[0])
        return f"sqlite:///{store.resolve().with_name(AUTH_DB_NAME)}"
    raise UserError(f"--auth with --backend-store-uri {backend_store_uri.split('://')[0]}://...: name the users' "
                    "database with --auth-database-uri (e.g. another database on the same server)")


@contextlib.contextmanager
def auth_config(env: dict[str, str], database_uri: str) -> Iterator[Path]:
    """MLflow's auth config for the server's life, in a private folder (0700, the file 0600): the
    users' database and the default permission; the admin's credentials stay in `env`. Sets
    MLFLOW_AUTH_CONFIG_PATH in `env`, and a CSRF key for this server's run unless one is set."""
    with tempfile.TemporaryDirectory(prefix="rsrefseg-mlflow-auth-") as folder:
        path = Path(folder) / "basic_auth.ini"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as ini:
            ini.write(f"[mlflow]\ndefault_permission = {AUTH_DEFAULT_PERMISSION}\ndatabase_uri = {database_uri}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")
        env[AUTH_CONFIG_ENV] = str(path)
        if not env.get(SECRET_KEY_ENV):
            env[SECRET_KEY_ENV] = secrets.token_hex(32)
        yield path


# --- owning the server's processes ---------------------------------------------------------------


class _StopRequest:
    """A signal handler that records the first stop signal (the wait loop acts on it)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum


def _parent_death_signal():
    """A preexec_fn that has Linux send the child SIGTERM when this process dies, even by SIGKILL
    (`guard` then ends the group); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def run_owned(cmd: list[str], *, env: dict[str, str] | None = None, name: str = "server",
              grace_s: float = STOP_GRACE_S) -> int:
    """Run `cmd` in a session (process group) of its own until it exits or a stop signal comes;
    either way, and on any error, end every process it started. Returns its exit code, or 0
    when a signal stopped it."""
    stop = _StopRequest()
    # Over the CLI's SIGTERM -> KeyboardInterrupt and Python's Ctrl-C; a signal ignored when the
    # command started stays ignored (SIGHUP under nohup, SIGINT in a background job).
    with signals.handling(STOP_SIGNALS, stop, keep_ignored=True):
        # The group's leader is `guard`, which runs `cmd`: it ends the group when this process dies.
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(grace_s), *cmd], env=env,
                                start_new_session=True, preexec_fn=_parent_death_signal())
        try:
            code = None
            while stop.signum is None and code is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(timeout=0.25)
        finally:
            end_process_tree(proc, grace_s)
    if stop.signum is not None:
        say(f"{name} stopped ({signal.Signals(stop.signum).name}): all its processes ended")
        return 0
    return code


def end_process_tree(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to `proc`'s process group and every descendant of `proc` (one that left the
    group too); SIGKILL to whatever is still running after `grace_s`."""
    for sig, patience in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        doomed = _running(_tree(proc))
        if not doomed:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for member in doomed:
            with contextlib.suppress(Exception):
                member.send_signal(sig)
        deadline = time.monotonic() + patience
        while _running(doomed) and time.monotonic() < deadline:
            proc.poll()  # reap the leader: a zombie holds no port but still counts as running
            time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def guard(argv: list[str]) -> int:
    """The leader of a server's process group (`python -m rsrefseg.jobs.ui GRACE CMD...`, started
    by `run_owned`): runs CMD in the group and returns its exit code. A stop signal (the owner's
    own, or the kernel's parent-death signal when the owner died, even by SIGKILL) ends the whole
    group: SIGTERM, then SIGKILL to all of it, this process last, once GRACE seconds pass or no
    other process of the group is left."""
    grace, cmd = float(argv[0]), argv[1:]
    child = subprocess.Popen(cmd)

    def end_group(signum, frame) -> None:
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _running(_group(os.getpgrp())):
            child.poll()
            time.sleep(0.05)
        os.killpg(0, signal.SIGKILL)

    for stop in STOP_SIGNALS:
        signal.signal(stop, end_group)
    return child.wait()


def _group(pgid: int) -> list:
    """The processes of process group `pgid`, but this one."""
    import psutil

    members = []
    for candidate in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if candidate.pid != os.getpid() and os.getpgid(candidate.pid) == pgid:
                members.append(candidate)
    return members


def _tree(proc: subprocess.Popen) -> list:
    """`proc`, its descendants, and whatever else is in its process group (children of a member
    that already ended are reparented, yet stay in the group)."""
    import psutil

    found = {}
    if proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(proc.pid)
            found = {p.pid: p for p in (leader, *leader.children(recursive=True))}
    for member in _group(proc.pid):
        found.setdefault(member.pid, member)
    return list(found.values())


def _running(procs: list) -> list:
    import psutil

    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


if __name__ == "__main__":
    sys.exit(guard(sys.argv[1:]))
