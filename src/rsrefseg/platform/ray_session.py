"""Starting or joining Ray, the same way for every job."""

from __future__ import annotations

import json
import logging
import os

import ray

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
    try:
        from ray._private import services  # private: guarded, so another Ray only loses the detection

        address = services.canonicalize_bootstrap_address(None)
        return address if address and address in services.find_gcs_addresses() else None
    except Exception:
        return None


def joins_existing_ray(cluster: ClusterConfig) -> bool:
    """True when `init_ray` would attach to a Ray that is already there (its size is not ours)."""
    return (ray.is_initialized() or bool(cluster.address or os.environ.get("RAY_ADDRESS", ""))
            or running_local_ray() is not None)


def _job_env_vars() -> dict:
    """The env_vars of the Ray job this driver runs in (`rsrefseg submit` already put the S3
    endpoint there); Ray refuses a ray.init that names one of them again."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # private: guarded

    try:
        config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
        return dict((config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def init_ray(cluster: ClusterConfig, *, runtime_env: dict | None = None) -> str:
    """Join the Ray named by `cluster.address`, else one already running on this machine, else
    start a local one. Returns how messages should name that Ray.

    A driver that already called `ray.init` (tests, a Ray job on a cluster) is left as it is:
    inside a submitted job `ray.init()` attaches to the job's cluster, which is what we want.
    """
    if ray.is_initialized():
        return "the Ray cluster"
    from rsrefseg.platform.storage import forwarded_environment

    kwargs: dict = {"namespace": cluster.namespace, "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    forwarded = {key: value for key, value in forwarded_environment().items()
                 if key not in _job_env_vars()}
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


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
