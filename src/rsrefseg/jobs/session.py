"""The one run session every job opens its run with, in one order:

    resolve -> probe -> resume -> Ray and capacity -> MLflow run -> lifecycle -> finish

1. `resolve`: every path and the MLflow store absolute on this machine (Ray workers and Tune
   trials run elsewhere), URIs checked for credentials.
2. `probe_run_store`, `probe_inputs`: object storage the job will use is tried from here, before
   any Ray resource is taken; each error names the key, the URI and what the store answered.
3. resume: the job reads its own saved folder (`platform.runs`), once the store is known good.
4. `start_ray`: start or join Ray; a training job refuses a cluster whose workers would leave Ray
   Data no CPU, and a multi-node cluster whose nodes do not share train.storage_path.
5. `open_run`: the MLflow run is created (or continued) and everything it records is written
   inside its lifecycle, with SIGTERM ending the block as Ctrl-C does: the run ends FINISHED,
   FAILED or KILLED however the block is left, never RUNNING.
6. finish: what the job does once its run is FINISHED (mark the run folder finished, register).

train, tune, evaluate and register all go through here; their drivers read as their own steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from rsrefseg.platform import paths, runs, signals, storage, tracking
from rsrefseg.platform.config import Config
from rsrefseg.platform.errors import ConfigError


@dataclass(frozen=True)
class Run:
    """The MLflow run a job writes into: its id and a client bound to its store (both None when
    tracking.enabled is false)."""

    run_id: str | None
    client: Any = None


@dataclass(frozen=True)
class Inputs:
    """The prepared dataset a run reads, as its MLflow dataset inputs: the manifest, its path and
    how the run uses each split ({"train": "train", "validation": "val"})."""

    manifest: dict
    path: str
    splits: dict[str, str]
    source: str = ""  # the name of a mixture's source (data.sources); "" = data.path


def resolve(cfg: Config) -> Config:
    """Step 1: the config as it runs on this machine: URIs checked (no credentials in them), then
    every path and the tracking store absolute here (`paths.localize`)."""
    flat = cfg.flat()
    for key in (*paths.path_keys(cfg), "tracking.artifact_location"):
        storage.check_uri(key, flat[key])
    return paths.localize(cfg)


def probe_run_store(root: storage.Location, resume: str | None = None) -> None:
    """Step 2, the store a run or sweep folder lives in, probed before that folder is read, so
    that a missing bucket or a refused key is said as such (not as "no run folder")."""
    if resume and storage.is_remote(resume):
        storage.check_writable("--resume", resume)
    elif isinstance(root, storage.RemotePath):
        storage.check_writable("train.storage_path", str(root))


def probe_inputs(cfg: Config, manifest_name: str) -> None:
    """Step 2, what the job reads and writes besides its folder: the dataset readable (its
    `manifest_name` file) and a direct MLflow artifact store writable."""
    for key, source in zip(cfg.data.source_path_keys(), cfg.data.source_list()):
        storage.check_readable(key, source.path, manifest_name)
    if cfg.tracking.enabled and storage.is_remote(cfg.tracking.artifact_location):
        storage.check_writable("tracking.artifact_location", cfg.tracking.artifact_location)


def check_splits(cfg: Config, splits) -> dict[str, dict]:
    """Each source's manifest (source name -> manifest), once every (key, split) of `splits` is
    known to be in it; else a ConfigError naming the key, the split, the source and its path."""
    from rsrefseg.datasets.prepare import load_manifest

    manifests = {}
    for source in cfg.data.source_list():
        manifest = manifests[source.name] = load_manifest(source.path)
        for key, split in splits:
            if split not in manifest["counts"]:
                which = f"source {source.name!r} (data.sources.{source.name}.path)" if source.name else "dataset"
                raise ConfigError(
                    f"{key}: split {split!r} is not in the prepared {which} {source.path} "
                    f"(it has {', '.join(sorted(manifest['counts']))})"
                )
    return manifests


def dataset_inputs(cfg: Config, manifests: dict[str, dict], splits: dict[str, str]) -> list[Inputs]:
    """A job's MLflow dataset inputs: one per source (data.path alone: one), from `check_splits`'
    manifests; `splits`: how the job uses each split ({"train": "train", "validation": "val"})."""
    return [Inputs(manifests[source.name], source.path, splits, source=source.name)
            for source in cfg.data.source_list()]


def dataset_hash(inputs: list[Inputs]) -> str:
    """The rsrefseg.dataset_hash tag: the content hash, or a mixture's `name=hash` list."""
    if len(inputs) == 1 and not inputs[0].source:
        return inputs[0].manifest.get("content_hash", "")
    return ",".join(f"{i.source}={i.manifest.get('content_hash', '')}" for i in inputs)


def start_ray(cfg: Config, *, ingest: bool) -> float | None:
    """Step 4: start or join Ray. `ingest`: a training job (returns the cluster's CPUs), whose
    train workers must leave Ray Data a CPU (a local Ray's size is checked before it starts, so
    nothing starts in vain; a joined cluster's after) and whose nodes must share its storage."""
    from rsrefseg.platform.capacity import check_ingest_capacity, cluster_cpus, local_cpus
    from rsrefseg.platform.ray_session import init_ray, joins_existing_ray
    from rsrefseg.platform.shared_storage import check_shared_storage

    if ingest and not joins_existing_ray(cfg.cluster):
        check_ingest_capacity(cfg, local_cpus(cfg), where="the local Ray this job starts (cluster.num_cpus)")
    where = init_ray(cfg.cluster)
    if not ingest:
        return None
    cpus = cluster_cpus()  # a joined Ray's own CPUs, whatever cluster.num_cpus says
    check_ingest_capacity(cfg, cpus, where=where)
    check_shared_storage(str(runs.storage_root(cfg)))  # several nodes: one storage for all of them
    return cpus


@contextlib.contextmanager
def open_run(cfg: Config, *, job: str, run_name: str, run_id: str | None = None, create: bool = True,
             parent_run_id: str | None = None, config_file: str | None = None,
             tags: dict[str, str] | None = None, inputs: Inputs | list[Inputs] | None = None) -> Iterator[Run]:
    """Steps 5 and 6: the job's MLflow run for the block. `run_id`: continue that run (a resume:
    set RUNNING again, nothing recorded twice); else a new one is created when `create` and
    tracking is on, with the config as params, `tags` (plus rsrefseg.job), the recipe file and
    the dataset `inputs`. Its state is `tracking.run_lifecycle`'s: FINISHED when the block
    completes, KILLED on Ctrl-C or SIGTERM, FAILED on an error, whatever step failed."""
    continued = run_id is not None
    if run_id is None and create and cfg.tracking.enabled:
        run_id = tracking.create_run(cfg, run_name=run_name, parent_run_id=parent_run_id,
                                     tags={"rsrefseg.job": job, **(tags or {})})
    if not cfg.tracking.enabled:
        run_id = None
    with signals.sigterm_interrupts(), tracking.run_lifecycle(cfg.tracking, run_id, continued=continued) as client:
        if client is not None and not continued:
            tracking.record_run(client, run_id, cfg, config_file=config_file)
            for item in [inputs] if isinstance(inputs, Inputs) else inputs or []:  # one per source
                tracking.log_dataset(client, run_id, item.manifest, item.path, item.splits, source=item.source)
        yield Run(run_id, client)
