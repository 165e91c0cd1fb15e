"""Will the job leave Ray Data a CPU? Checked before training starts, so a job never waits forever.

Ray Train reserves its workers' resources and Ray Data schedules its preprocessing tasks (one
CPU each) on what is left. When the train workers (times Tune's concurrent trials) hold every CPU,
ingest gets none and the job sits at 0 rows with no message. These checks compare the job's
needs with the cluster's CPUs and either fail at once, naming the numbers and the keys to change,
or (Tune) run fewer trials at a time so that ingest keeps its CPUs.
"""

from __future__ import annotations

import math
import os

from rsrefseg.platform.config import Config
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError

# What to do about it, in the words of the config keys.
REMEDY = (
    "lower train.cpus_per_worker (tune.cpus_per_worker in a sweep; fractions are fine, e.g. 0.5: "
    "a train worker mostly waits on its model) or train.num_workers, or give Ray more logical CPUs (cluster.num_cpus for a local Ray, "
    "`ray start --num-cpus N` on a node); cluster.check_capacity=false skips this check (an "
    "autoscaling cluster whose nodes are not up yet)"
)


class NotEnoughCPUs(ConfigError):
    """The job's train workers would leave Ray Data's preprocessing no CPU."""


def local_cpus(cfg: Config) -> float:
    """The CPUs of the local Ray this job would start (cluster.num_cpus, else Ray's detection)."""
    return float(cfg.cluster.num_cpus or os.cpu_count() or 1)


def trial_cpus(cfg: Config, driver_cpu: float = 0.0) -> float:
    """CPUs one run (a Tune trial: its driver too) reserves for its train workers."""
    return cfg.train.num_workers * cfg.train.cpus_per_worker + driver_cpu


def check_ingest_capacity(cfg: Config, cluster_cpus: float, *, where: str) -> None:
    """Fail when one run's train workers leave fewer than `train.ingest_cpus` CPUs for ingest."""
    if not cfg.cluster.check_capacity:
        return
    workers = trial_cpus(cfg)
    left = cluster_cpus - workers
    if left < cfg.train.ingest_cpus:
        raise NotEnoughCPUs(
            f"train.num_workers={cfg.train.num_workers} x train.cpus_per_worker={cfg.train.cpus_per_worker:g} "
            f"= {workers:g} CPUs for the train workers leaves {max(left, 0):g} of the {cluster_cpus:g} CPUs "
            f"of {where} for Ray Data's preprocessing, which needs train.ingest_cpus={cfg.train.ingest_cpus}; "
            f"the job would wait for data forever. To fix: {REMEDY}"
        )


def concurrent_trials(cfg: Config, cluster_cpus: float, *, driver_cpu: float, where: str) -> int:
    """How many Tune trials may run at once and still leave ingest its CPUs.

    tune.max_concurrent_trials (0 = as many as fit) is lowered to what fits, with a printed note;
    a single trial that does not fit fails as `check_ingest_capacity` does."""
    check_ingest_capacity(cfg, cluster_cpus - driver_cpu, where=where)
    asked = cfg.tune.max_concurrent_trials
    if not cfg.cluster.check_capacity:
        return asked
    per_trial = trial_cpus(cfg, driver_cpu)
    fit = max(1, math.floor((cluster_cpus - cfg.train.ingest_cpus) / per_trial + 1e-9))
    if asked and asked <= fit:
        return asked
    say(
        f"running {fit} trial(s) at a time: each needs {per_trial:g} CPUs "
        f"(train.num_workers x train.cpus_per_worker, or tune.* where set, plus its driver) and Ray Data keeps "
        f"train.ingest_cpus={cfg.train.ingest_cpus} of the {cluster_cpus:g} CPUs of {where}"
        + (f" (tune.max_concurrent_trials={asked} would starve it)" if asked else "")
    )
    return fit


def cluster_cpus() -> float:
    """CPUs of the Ray this process is connected to: those it has now or, for an autoscaling
    cluster (cluster.yaml's head has no CPUs and its workers start at 0), the most its
    autoscaler may bring up, read where Ray Train reads it for its own worker-group check."""
    import ray

    from rsrefseg.platform.ray_compat import autoscaler_max_resources

    now = float(ray.cluster_resources().get("CPU", 0.0))
    return max(now, autoscaler_max_resources().get("CPU", 0.0))


def largest_node_cpus() -> float:
    """CPUs of the connected Ray's biggest live node (0 when none has any yet): the most one
    actor can hold, since an actor never spans nodes."""
    import ray

    return max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def describe_resources() -> str:
    """Free and total resources of the connected Ray, for a stall message."""
    import ray

    try:
        total, free = ray.cluster_resources(), ray.available_resources()
    except Exception as exc:  # not connected, or the GCS is gone: say so rather than fail again
        return f"(cluster resources unavailable: {exc})"
    keys = [k for k in ("CPU", "GPU", "memory", "object_store_memory") if k in total]
    parts = []
    for k in keys:
        scale = 2**30 if "memory" in k else 1
        unit = " GiB" if scale > 1 else ""
        parts.append(f"{k} {free.get(k, 0) / scale:.1f}/{total[k] / scale:.1f}{unit} free")
    return "cluster: " + ", ".join(parts)
