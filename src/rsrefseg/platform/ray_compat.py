"""The Ray internals this project relies on, all in one place.

Each function here reads something the installed Ray offers no public API for. Every other
module uses Ray's public API only (`ray.init`, `ray.nodes`, `ray.cluster_resources`,
`ray.train.DataConfig`, ...), so a Ray upgrade that renames or removes an internal breaks this
module alone, and tests/platform/test_ray_compat.py says which internal is gone.

At run time each function is guarded: with a Ray that lacks the internal, the feature built on
it degrades as its docstring says, and no job fails because of it.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

# The variable in which Ray's job supervisor hands a submitted job's driver its job config (JSON
# with "runtime_env" and "metadata"), which `ray.init` then applies. Ray names it by this same
# string in `ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR`.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def started_ray_address(temp_dir: str | None = None) -> str | None:
    """The GCS address of the Ray that the last `ray start` on this machine left running, or None.

    Ray records that address in its temp dir (`temp_dir`, default Ray's own: /tmp/ray/
    ray_current_cluster), which `ray.init()` without an address reads. A record whose Ray is gone
    (killed without `ray stop`) gives None, as does a Ray without these internals. RAY_ADDRESS,
    when set, is what Ray reports instead: callers that mean "started by `ray start`" check it first.
    """
    try:
        from ray._private import services

        address = services.canonicalize_bootstrap_address(None, temp_dir)
        return address if address and address in services.find_gcs_addresses() else None
    except Exception:
        return None


def job_env_vars(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The env_vars of the runtime env of the Ray job this driver runs in ({} outside a job, or
    when the job config cannot be read)."""
    try:
        config = json.loads(environ.get(JOB_CONFIG_ENV, "{}"))
        return dict((config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def autoscaler_max_resources() -> dict[str, float]:
    """The most of each resource the connected Ray's autoscaler may bring up, from its cluster
    config (the figure Ray Train checks its worker group against). {} for a Ray without an
    autoscaler config (a local Ray, `ray start` nodes), or one without this internal."""
    try:
        from ray._private.state import state

        return {key: float(value) for key, value in (state.get_max_resources_from_cluster_config() or {}).items()}
    except Exception:
        return {}


def filter_worker_logs(keep: Callable[[dict], list[str]]) -> bool:
    """Have the lines that log_to_driver forwards from workers pass through `keep` (one batch of
    Ray's log records -> the lines to print) before Ray prints them on this driver. Ray offers no
    public hook: its printer is `ray._private.worker.print_worker_logs`. Installed once; False for
    a Ray without it (then every line prints as Ray prints it)."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return False
    original = getattr(ray_worker, "print_worker_logs", None)
    if original is None:
        return False
    if getattr(original, "rsrefseg_filter", False):
        return True

    def print_worker_logs(data: dict, print_file, ignore_prefix: bool = False):
        lines = keep(data)
        if lines:
            original({**data, "lines": lines}, print_file, ignore_prefix)

    print_worker_logs.rsrefseg_filter = True
    ray_worker.print_worker_logs = print_worker_logs
    return True
