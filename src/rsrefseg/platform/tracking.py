"""MLflow tracking: one place that knows the store, the run layout and what every run records.

The driver creates the run and logs params/tags; rank 0 of the training workers logs metrics
and artifacts into that run by id through an `MlflowClient` (no global "active run" state, so
the same code works in a Ray worker, a Tune trial and the driver).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator

from rsrefseg.platform.config import Config, TrackingConfig
from rsrefseg.platform.errors import TrainingInterrupted
from rsrefseg.platform.paths import artifact_location, is_uri, portable, tracking_uri

# Set on a Tune trial's run that the scheduler (ASHA) stopped before its last epoch.
STOPPED_EARLY_TAG = "rsrefseg.stopped_early"

# The packages whose versions every run records.
TRACKED_PACKAGES = (
    "rsrefseg", "torch", "torchvision", "ray", "deepspeed", "transformers", "peft",
    "segment-anything", "mlflow", "numpy", "pyarrow",
)


def client(tracking: TrackingConfig):
    """A client of the configured store. Everything here goes through a client bound to its URI,
    never through MLflow's process-global tracking URI or active run, so the same code works in a
    Ray worker, a Tune trial and the driver, and two stores in one process do not mix."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(tracking))


# The states of an MLflow run: RUNNING inside run_lifecycle, then one by how its block ended.
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"


@contextlib.contextmanager
def run_lifecycle(tracking: TrackingConfig, run_id: str | None, *, continued: bool = False) -> Iterator[Any]:
    """The one place an MLflow run changes state. Inside the block the run is RUNNING (a
    continued run, e.g. a resume, is set RUNNING again and loses an earlier scheduler's
    `stopped early` tag); it ends FINISHED when the block completes, KILLED when it is left by
    Ctrl-C, SIGTERM (the CLI turns it into KeyboardInterrupt), SystemExit or a
    `TrainingInterrupted`, and FAILED on any other exception. Yields the client (None without a
    run: tracking off)."""
    if run_id is None:
        yield None
        return
    c = client(tracking)
    if continued:
        c.update_run(run_id, status=RUNNING)
        if STOPPED_EARLY_TAG in c.get_run(run_id).data.tags:
            c.delete_tag(run_id, STOPPED_EARLY_TAG)
    try:
        yield c
    except BaseException as exc:
        c.set_terminated(run_id, status=ending_status(exc))
        raise
    c.set_terminated(run_id, status=FINISHED)


def ending_status(exc: BaseException | None) -> str:
    """How a run ends when its block is left by `exc`: KILLED for Ctrl-C, SIGTERM (the CLI turns
    it into KeyboardInterrupt), SystemExit or a `TrainingInterrupted`; FAILED for anything else;
    FINISHED without an exception."""
    if exc is None:
        return FINISHED
    return KILLED if isinstance(exc, (KeyboardInterrupt, SystemExit, TrainingInterrupted)) else FAILED


def end_run(c, run_id: str, status: str, *, tags: dict[str, str] | None = None) -> None:
    """End a run whose process is gone (a Tune trial stopped by its scheduler, killed by an
    interruption, or failed before its own lifecycle began): the one other place a state is set."""
    for key, value in (tags or {}).items():
        c.set_tag(run_id, key, value)
    c.set_terminated(run_id, status=status)


@contextlib.contextmanager
def fluent_store(tracking: TrackingConfig, run_id: str) -> Iterator[None]:
    """For the few MLflow calls that only exist in its fluent API (`pyfunc.log_model`): the
    store and run are set for the block and put back after it. The run's state stays
    `run_lifecycle`'s to set: the fluent run is detached as RUNNING, never ended here (MLflow's
    own context would end it FAILED on Ctrl-C)."""
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(tracking_uri(tracking))
    try:
        mlflow.start_run(run_id=run_id)
        try:
            yield
        finally:
            mlflow.end_run(status=RUNNING)
    finally:
        mlflow.set_tracking_uri(previous)  # None: unset again, as before


# MLflow 3's UI opens an experiment in the view its kind names; without the tag it guesses, and
# guesses "GenAI" for runs it does not recognise. Ours are model-training experiments.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow's dataset digest column holds 36 characters: the first 32 hex digits of the content hash
# (the full hash stays in the rsrefseg.dataset_hash tag).
DIGEST_CHARS = 32


def experiment_id(tracking: TrackingConfig, name: str | None = None) -> str:
    """The experiment's id, created as a model-training experiment when it does not exist (an
    existing one without a kind gets it; a kind someone chose is left alone)."""
    c = client(tracking)
    name = name or tracking.experiment
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_location(tracking),
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def log_dataset(c, run_id: str, manifest: dict, path: str, splits: dict[str, str], *, source: str = "") -> None:
    """The prepared dataset as the run's MLflow dataset inputs (the runs table's Dataset column):
    one per split the run read, named `<format>:<folder>/<split>` (MLflow keeps one input per
    name and digest), tagged with how the run used it (mlflow.data.context: train, validation,
    evaluation); digest = the manifest's content hash; profile = the split's sample and category
    counts. A mixture's source (data.sources.<source>) is named `<format>:<source>/<split>` and
    tagged rsrefseg.source."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = path.split("://", 1)[0] if is_uri(path) else "local"
    folder = source or Path(path.rstrip("/")).name
    extra = [InputTag("rsrefseg.source", source)] if source else []
    inputs = []
    for context, split in splits.items():
        dataset = Dataset(
            name=f"{manifest.get('format', 'dataset')}:{folder}/{split}",
            digest=manifest.get("content_hash", "")[:DIGEST_CHARS],
            source_type=source_type,
            source=json.dumps({"uri": path, "split": split}),
            schema=json.dumps({"columns": manifest.get("columns", [])}),
            profile=json.dumps({"samples": manifest.get("counts", {}).get(split, 0),
                                "categories": manifest.get("categories", {}).get(split, {})}),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context), InputTag("rsrefseg.split", split), *extra]))
    c.log_inputs(run_id, datasets=inputs)


def create_run(cfg: Config, *, run_name: str, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    """A new RUNNING run with its name and provenance tags; return its id. What else it records
    (`record_run`) is written inside its lifecycle, so that a failure there ends it."""
    c = client(cfg.tracking)
    all_tags = {"mlflow.runName": run_name, "rsrefseg.git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return c.create_run(experiment_id(cfg.tracking), run_name=run_name, tags=all_tags).info.run_id


def record_run(c, run_id: str, cfg: Config, *, config_file: str | None = None) -> None:
    """The config as flat params, the package versions, the recipe file and the resolved config."""
    # Params as a checkpoint keeps them: paths under the project folder relative to it, so the
    # same run started on two machines (or nodes) lines up in the compare view and names neither.
    log_params(c, run_id, portable(cfg).flat())
    log_params(c, run_id, {f"version.{k}": v for k, v in package_versions().items()})
    if config_file and Path(config_file).is_file():
        c.log_artifact(run_id, config_file, artifact_path="config")
    c.log_text(run_id, cfg.to_yaml(), "config/resolved.yaml")


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    # Any number: MlflowClient.log_batch sends them in requests of the 100 params a store takes.
    c.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())])


def now_ms() -> int:
    """MLflow's timestamp of this moment (milliseconds since the epoch)."""
    import time

    return int(time.time() * 1000)


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int, *, timestamp_ms: int | None = None) -> None:
    """timestamp_ms: when the values were measured (default: now), for a caller that logs later."""
    from mlflow.entities import Metric

    now = now_ms() if timestamp_ms is None else timestamp_ms
    batch = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()]
    if batch:
        c.log_batch(run_id, metrics=batch)


def logged_steps(c, run_id: str, key: str) -> set[int]:
    """Steps already recorded for a metric: lets a resumed run skip what it logged before."""
    return {m.step for m in c.get_metric_history(run_id, _metric_key(key))}


def _metric_key(key: str) -> str:
    # MLflow metric names allow [A-Za-z0-9_-./ ]; the paper's "Pr@0.5" becomes "Pr_0.5".
    return key.replace("@", "_")


def _param_value(v: Any) -> str:
    return "" if v is None else str(v)


def package_versions(packages: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    """The commit of the code being run, with '+dirty' for uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
