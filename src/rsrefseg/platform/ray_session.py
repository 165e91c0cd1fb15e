"""Starting or joining Ray, the same way for every job."""

from __future__ import annotations

import logging
import os

import ray

from rsrefseg.platform import ray_compat
from rsrefseg.platform.config import ClusterConfig

log = logging.getLogger(__name__)


def running_local_ray() -> str | None:
    """The address of a Ray that `ray start` left running on this machine, or None.

    `ray.init()` without an address joins such a Ray by itself (Ray records the last `ray start`
    in its temp dir: /tmp/ray/ray_current_cluster) and then refuses num_cpus/num_gpus, so a job
    must know before it asks for a Ray of its own size. A record whose Ray is gone (killed without
    `ray stop`) does not count."""
    if os.environ.get("RAY_ADDRESS"):
        return None  # an explicit address wins; init_ray joins that one
    return ray_compat.started_ray_address()


def joins_existing_ray(cluster: ClusterConfig) -> bool:
    """True when `init_ray` would attach to a Ray that is already there (its size is not ours)."""
    return (ray.is_initialized() or bool(cluster.address or os.environ.get("RAY_ADDRESS", ""))
            or running_local_ray() is not None)


def init_ray(cluster: ClusterConfig, *, runtime_env: dict | None = None) -> str:
    """Join the Ray named by `cluster.address`, else one already running on this machine, else
    start a local one. Returns how messages should name that Ray.

    A driver that already called `ray.init` (tests, a Ray job on a cluster) is left as it is:
    inside a submitted job `ray.init()` attaches to the job's cluster, which is what we want.
    Ray's own output goes to the command's log file, not the console (`_route_ray_output`).
    """
    _route_ray_output()
    if ray.is_initialized():
        return "the Ray cluster"
    from rsrefseg.platform.storage import forwarded_environment

    kwargs: dict = {"namespace": cluster.namespace, "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    forwarded = {key: value for key, value in forwarded_environment().items()
                 if key not in ray_compat.job_env_vars()}  # Ray refuses a ray.init that names one again
    if address and forwarded:
        # A joined cluster's processes have their nodes' environment, not ours: the S3 endpoint
        # and region this driver uses go with the job (credentials stay with each node).
        env = dict(kwargs.get("runtime_env") or {})
        env["env_vars"] = {**forwarded, **env.get("env_vars", {})}
        kwargs["runtime_env"] = env
    if address:
        log.info("joining Ray at %s", address)
        ray.init(address=address, **kwargs)
        return "the Ray cluster"
    local = running_local_ray()
    if local:
        log.info("joining the Ray already running on this machine at %s (started by `ray start`): the job "
                 "uses its CPUs and GPUs, and cluster.num_cpus/num_gpus do not apply; `ray stop` it for a "
                 "job-sized Ray of the job's own", local)
        ray.init(address=local, **kwargs)
        return f"the Ray already running on this machine ({local}, from `ray start`)"
    # A local Ray. Logical CPUs may exceed the cores: train workers and Ray Data's CPU tasks
    # must be schedulable side by side, or ingest starves behind the training workers.
    if cluster.num_cpus:
        kwargs["num_cpus"] = cluster.num_cpus
    if cluster.num_gpus:
        kwargs["num_gpus"] = cluster.num_gpus
    # The dashboard (http://127.0.0.1:8265) also serves the State API, which Ray Train's
    # placement-group cleaner polls; without it the job log fills with warnings.
    # address="local": a new Ray even where a stale `ray start` record names one that is gone.
    ray.init(address="local", **kwargs)
    return "the local Ray this job started"


def _route_ray_output() -> None:
    """The console keeps the platform's lines, warnings and errors; Ray's own output goes to the
    command's log file (console.setup), and with --verbose to both:
    - the driver's Ray loggers (ray, ray.data, ...) lose their console handlers (console.adopt);
    - Ray Data's progress bars are off (DataContext here, RAY_DATA_DISABLE_PROGRESS_BARS in the
      processes a local Ray starts); its execution notices still reach the file;
    - the lines log_to_driver forwards from workers (Ray Train's per-rank "Reporting training
      result" and "Checkpoint successfully created", Ray Data's execution notices) are sorted by
      console.worker_lines before Ray prints them. Ray's own knobs do not reach those: a job's
      ray.LoggingConfig also reconfigures this driver's root logger, and Ray Train resets its
      workers' loggers to INFO when their group starts.
    Nothing changes where the host process owns logging (tests, an embedding application)."""
    from rsrefseg.platform import console

    if not console.active():
        return
    import ray.data
    from ray.util.debug import log_once

    console.adopt()
    console.name_log()
    if not console.verbose():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        ray.data.DataContext.get_current().enable_progress_bars = False
        log_once("ray_data_progress_manager_disabled")  # Ray Data's warning that they are off: we know
    ray_compat.filter_worker_logs(_sorted_worker_lines)


def _sorted_worker_lines(data: dict) -> list[str]:
    """The lines of one batch that log_to_driver forwards that the console shows (all of them go
    to the log file); the cluster's own events (autoscaler, raylet) stay as they are."""
    from rsrefseg.platform import console

    lines = list(data.get("lines") or [])
    if data.get("pid") in ("autoscaler", "raylet"):
        return lines
    source = f"{data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')}".strip()
    return console.worker_lines(lines, source)
