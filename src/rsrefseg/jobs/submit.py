"""`rsrefseg submit` and `rsrefseg jobs`: running the platform's jobs on a Ray cluster.

The Ray Jobs API (`JobSubmissionClient`) ships this package's code with the job: the package
folder goes as a `py_modules` entry (on the path of the driver and of every worker), with the
recipes it holds (rsrefseg/configs). From a source checkout (an editable install) the checkout
also travels as the `working_dir`, so the job sees its files as they are here; an installed
package ships itself alone, never the folder `rsrefseg submit` runs in. The cluster needs only
Ray and the dependencies. Everything the job names (config files, data paths, the MLflow URI) is
resolved there, by the job's driver on the cluster: the laptop's paths mean nothing on it. A
config file resolves in Ray's copy of the working_dir, else under the job's project root, else
as a shipped recipe's name (platform/recipes.py); data, weights and run folders against the
project root (`--root`, else the RSREFSEG_HOME the cluster's nodes were started with;
platform/paths.py).

The same submission with Ray's own CLI:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["src/rsrefseg"], "env_vars": {"RSREFSEG_SUBMITTED": "1"}}' \
        -- python -m rsrefseg train --config configs/demo.yaml tracking.uri=http://127.0.0.1:5000
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.errors import UserError
from rsrefseg.platform.paths import HOME_ENV, redact
from rsrefseg.platform.recipes import shipped_file

SUBMITTABLE = ("train", "evaluate", "tune", "predict", "prepare", "demo-data")
# Not shipped in the working_dir: local state and large files that live on the cluster instead.
EXCLUDES = [".venv", ".git", "runs", "data", "weights", "mlflow.db", "mlartifacts", "mlruns",
            "**/__pycache__", "*.egg-info", ".pytest_cache", ".whl", ".gl"]
SUBMITTED_ENV = "RSREFSEG_SUBMITTED"  # set in the job's environment: errors then name the cluster host
# This package's folder (src/rsrefseg in a checkout, site-packages/rsrefseg when installed).
PACKAGE = Path(__file__).resolve().parents[1]
# A URI with a user name or password in it (scheme://user:password@host or scheme://user@host).
_URI_LOGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*@")

log = logging.getLogger(__name__)


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise ConfigError("--address: no Ray cluster named; pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address


class CodeNotFound(UserError):
    """The package's code or its recipes are not where this module expects them."""


def package_dir(pkg: Path | None = None) -> Path:
    """The package folder the job ships: its code and its recipes (configs/), or refuse."""
    pkg = pkg or PACKAGE
    if not (pkg / "__init__.py").is_file() or not (pkg / "configs").is_dir():
        raise CodeNotFound(f"submit: cannot ship the code: {pkg} is not the rsrefseg package with its "
                           "recipes (configs/); reinstall rsrefseg")
    return pkg


def checkout_dir(pkg: Path | None = None) -> Path | None:
    """The source checkout an editable install runs from (src/rsrefseg beside pyproject.toml and
    configs/), else None: an installed package has no checkout to ship."""
    pkg = pkg or PACKAGE
    root = pkg.parent.parent
    if pkg.parent.name == "src" and (root / "pyproject.toml").is_file() and (root / "configs").is_dir():
        return root
    return None


def runtime_env(root: str | None = None) -> dict:
    """The job's code and environment; `root`: the project folder on the cluster's nodes, where
    the job's relative data/weights/runs paths resolve (as RSREFSEG_HOME, so every job kind,
    `--resume` included, sees it). The S3 endpoint and region set here travel with the job
    (credentials never do: the nodes have their own)."""
    from rsrefseg.platform.storage import forwarded_environment

    pkg = package_dir()
    env_vars = {**forwarded_environment(), SUBMITTED_ENV: "1", "PYTHONUNBUFFERED": "1"}
    if root:
        env_vars[HOME_ENV] = root
    env = {"excludes": EXCLUDES, "py_modules": [str(pkg)], "env_vars": env_vars}
    checkout = checkout_dir(pkg)
    if checkout is not None:  # never the working directory: the checkout, from wherever this runs
        env["working_dir"] = str(checkout)
    return env


def local_files_left_behind(job: list[str], env: dict) -> list[str]:
    """The job's --config/--sweep files that exist only here: with no working_dir shipped, the
    job reads them on the cluster (under its project root), where only shipped recipes travel."""
    if "working_dir" in env:
        return []
    kinds = {"--config": "recipe", "--sweep": "sweep"}
    return [f"{flag} {value}" for flag, value in zip(job, job[1:])
            if flag in kinds and Path(value).is_file() and shipped_file(value, kinds[flag]) is None]


def entrypoint(job: list[str]) -> str:
    if job and job[0] == "--":
        job = job[1:]
    if not job or job[0] not in SUBMITTABLE:
        raise ConfigError(f"submit: name the job after --, one of {', '.join(SUBMITTABLE)} "
                          "(e.g. rsrefseg submit -- train --config configs/demo.yaml)")
    for arg in job:  # the entrypoint is recorded by the cluster and shown by `rsrefseg jobs list`
        if _URI_LOGIN.search(arg):
            raise ConfigError(f"submit: {redact(arg)}: a user name or password in a URI would be recorded with "
                              "the job; take it out of the URI: MLflow reads MLFLOW_TRACKING_USERNAME and "
                              "MLFLOW_TRACKING_PASSWORD, and object storage the AWS settings, from the environment "
                              "of the cluster's nodes")
    return "python -m rsrefseg " + " ".join(shlex.quote(a) for a in job)


def _client(address: str | None):
    """A Jobs API client that authenticates where the cluster wants it. Ray 2.59+ starts local
    heads with token authentication on, but its client sends the token only when RAY_AUTH_MODE
    is "token" in the client's own environment; so send it whenever one is found."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token, address = auth_token(), dashboard_address(address)
    if token and not private_channel(address):
        log.warning(f"sending Ray's auth token to {redact(address)} over plain http, where anyone on the network "
                    "path can read it and run code on the cluster; reach the dashboard through an SSH tunnel "
                    "(ssh -L 8265:127.0.0.1:8265 HEAD, then --address http://127.0.0.1:8265) or over https")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise ClusterAuthError(_auth_advice(address, sent=bool(token), ray_says=str(exc))) from None


def private_channel(address: str) -> bool:
    """Whether a token sent to `address` stays private: https, or a loopback address (this
    machine, or an SSH tunnel's end of it: 127.0.0.0/8, ::1, localhost)."""
    parts = urlsplit(address)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClusterAuthError(UserError):
    """The cluster refused our token, or wants one and none was found here."""


def _auth_advice(address: str, *, sent: bool, ray_says: str) -> str:
    first = ray_says.strip().splitlines()[0] if ray_says.strip() else "authentication failed"
    if sent:
        return (f"{redact(address)} refused the Ray token found here ({first}). It is not the cluster's token: "
                "copy the head's (run `ray get-auth-token` on the head) into ~/.ray/auth_token here, or "
                "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file that holds it")
    return (f"{redact(address)} has Ray token authentication on and no token was found here ({first}). "
            "Run `ray get-auth-token` on the head and put what it prints into ~/.ray/auth_token here "
            "(or set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file that holds it); then run this again")


def auth_token(environ=os.environ) -> str:
    """Ray's token, where Ray's docs say it lives, in Ray's order: $RAY_AUTH_TOKEN, the file
    $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. "" when there is none."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    path = Path(environ["RAY_AUTH_TOKEN_PATH"]) if environ.get("RAY_AUTH_TOKEN_PATH") else Path.home() / ".ray" / "auth_token"
    try:
        return path.read_text().strip()
    except OSError:
        if environ.get("RAY_AUTH_TOKEN_PATH"):
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token file") from None
        return ""


def run_submit(job: list[str], *, address: str | None = None, wait: bool = True, root: str | None = None) -> int:
    """Submit; print the job id; stream its logs; exit with 0 only if the job SUCCEEDED."""
    command = entrypoint(job)
    if root and not os.path.isabs(root):
        raise ConfigError(f"--root {root}: name the folder on the cluster's nodes by its absolute path")
    env = runtime_env(root)
    for given in local_files_left_behind(job, env):
        say(f"note: {given} is a file here, not a shipped recipe: the job reads it on the cluster, "
            "under its project folder (--root)")
    client = _client(address)
    job_id = _submit_when_agent_ready(client, command, env)
    say(f"submitted {job_id}: {command}")
    say(f"follow: rsrefseg jobs logs {job_id}   stop: rsrefseg jobs stop {job_id}")
    if not wait:
        return 0
    return follow(client, job_id)


def _submit_when_agent_ready(client, command: str, env: dict, patience_s: float = 120.0) -> str:
    """Submit, retrying while the head's job agent is still starting.

    A freshly started head answers HTTP before its job agent registers and then refuses with
    "No available agent to submit job"; that is transient, every other error is not.
    """
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client, job_id: str) -> int:
    from ray.job_submission import JobStatus

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(stream())
    status = client.get_job_status(job_id)
    say(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def run_jobs(action: str, job_id: str | None, *, address: str | None = None) -> int:
    client = _client(address)
    if action == "list":
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")
        return 0
    if not job_id:
        raise ConfigError(f"jobs {action}: name the job id (see `rsrefseg jobs list`)")
    if action == "logs":
        return follow(client, job_id)
    if action == "status":
        print(client.get_job_status(job_id).value)
        return 0
    stopped = client.stop_job(job_id)
    say(f"{job_id}: {'stop requested' if stopped else 'not running'}")
    return 0
