"""Starting or joining Ray, the same way for every job."""

from __future__ import annotations

import logging
import os

import ray

from rsrefseg.platform.config import ClusterConfig

log = logging.getLogger(__name__)


def joins_existing_ray(cluster: ClusterConfig) -> bool:
    """True when `init_ray` would attach to a Ray that is already there (its size is not ours)."""
    return ray.is_initialized() or bool(cluster.address or os.environ.get("RAY_ADDRESS", ""))


def init_ray(cluster: ClusterConfig, *, runtime_env: dict | None = None) -> None:
    """Join the Ray named by `cluster.address`, or start a local one when it is empty.

    A driver that already called `ray.init` (tests, a Ray job on a cluster) is left as it is:
    inside a submitted job `ray.init()` attaches to the job's cluster, which is what we want.
    """
    if ray.is_initialized():
        return
    kwargs: dict = {"namespace": cluster.namespace, "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        log.info("joining Ray at %s", address)
        ray.init(address=address, **kwargs)
        return
    # A local Ray. Logical CPUs may exceed the cores: train workers and Ray Data's CPU tasks
    # must be schedulable side by side, or ingest starves behind the training workers.
    if cluster.num_cpus:
        kwargs["num_cpus"] = cluster.num_cpus
    if cluster.num_gpus:
        kwargs["num_gpus"] = cluster.num_gpus
    # The dashboard (http://127.0.0.1:8265) also serves the State API, which Ray Train's
    # placement-group cleaner polls; without it the job log fills with warnings.
    ray.init(**kwargs)


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
