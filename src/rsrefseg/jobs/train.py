"""`rsrefseg train`: the driver side of a distributed training run.

Validates everything it can before taking Ray resources, builds the Ray Data streams, creates the
MLflow run, and runs a Ray Train `TorchTrainer` whose workers execute `training.worker.train_func`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rsrefseg.models.checkpoint_folder import CONFIG_FILE
from rsrefseg.platform import paths, runs, storage, tracking
from rsrefseg.platform.config import Config
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.errors import TrainingFailed, TrainingInterrupted  # noqa: F401 (raised here, caught by the CLI)
from rsrefseg.platform.ray_session import init_ray, joins_existing_ray


@dataclass
class TrainOutcome:
    name: str
    run_dir: storage.Location  # a local folder or a storage.RemotePath (s3://...)
    mlflow_run_id: str | None
    best_checkpoint: storage.Location  # a model checkpoint folder (weights.safetensors + config.yaml)
    best_metrics: dict
    history: list[dict]
    # True when the run had already finished and nothing was trained again (a resumed finished
    # run, or a Tune trial whose training ended just before the sweep was interrupted).
    already_finished: bool = False


def preflight(cfg: Config) -> dict:
    """Checks that need no Ray: the prepared dataset, the model files, what the run must do at
    its end. Returns the manifest."""
    from rsrefseg.datasets.prepare import load_manifest
    from rsrefseg.models.presets import check_model_files, get_preset

    if cfg.train.register_as and not cfg.tracking.enabled:
        # Checked here, not in the schema: evaluate and predict read a trained run's config
        # (register_as included) with MLflow off, which is fine for them.
        raise ConfigError("train.register_as: registers the model in MLflow, which tracking.enabled=false turns off")
    weights = ("model.sam_checkpoint", "model.siglip_path") if get_preset(cfg.model.preset).pretrained else ()
    paths.require(cfg, ("data.path", *weights))  # names this host: a cluster's paths are not the laptop's
    check_storage(cfg)
    check_model_files(cfg.model)
    manifest = load_manifest(cfg.data.path)
    for key, split in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)):
        if split not in manifest["counts"]:
            raise ConfigError(
                f"{key}: split {split!r} is not in the prepared dataset {cfg.data.path} "
                f"(it has {', '.join(sorted(manifest['counts']))})"
            )
    rows = _rows(manifest, cfg.data.train_split, cfg.data.limit)
    if steps_per_epoch(cfg, rows) < 1:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {rows} training samples of "
            f"{cfg.data.path} split over {cfg.train.num_workers} workers; lower it"
        )
    return manifest


def check_storage(cfg: Config) -> None:
    """Object storage the run will use, probed from here before any Ray resource: the dataset
    readable and a direct MLflow artifact store writable (each error names the key, the URI and
    what the store answered). The run folder's store was probed before the folder was read
    (`check_storage_root`, called first by train and tune)."""
    from rsrefseg.datasets.prepare import MANIFEST

    storage.check_readable("data.path", cfg.data.path, MANIFEST)
    if cfg.tracking.enabled and storage.is_remote(cfg.tracking.artifact_location):
        storage.check_writable("tracking.artifact_location", cfg.tracking.artifact_location)


def check_storage_root(root: storage.Location, resume: str | None) -> None:
    """The store a run or sweep folder lives in, probed before that folder is read, so that a
    missing bucket or a refused key is said as such (not as "no run folder")."""
    if resume and storage.is_remote(resume):
        storage.check_writable("--resume", resume)
    elif isinstance(root, storage.RemotePath):
        storage.check_writable("train.storage_path", str(root))


def start_ray_with_ingest_cpus(cfg: Config) -> float:
    """Start or join Ray, refusing a job whose train workers would leave Ray Data no CPU (one
    run's workers; Tune then fits its trials to what is left). A local Ray's size is known before
    it starts, so that is checked first and nothing starts in vain; a joined cluster's after.
    On several nodes, train.storage_path must be shared by all of them. Returns the cluster's CPUs."""
    from rsrefseg.platform.capacity import check_ingest_capacity, cluster_cpus, local_cpus
    from rsrefseg.platform.shared_storage import check_shared_storage

    if not joins_existing_ray(cfg.cluster):
        check_ingest_capacity(cfg, local_cpus(cfg), where="the local Ray this job starts (cluster.num_cpus)")
    where = init_ray(cfg.cluster)
    cpus = cluster_cpus()  # a joined Ray's own CPUs, whatever cluster.num_cpus says
    check_ingest_capacity(cfg, cpus, where=where)
    check_shared_storage(str(runs.storage_root(cfg)))  # several nodes: one storage for all of them
    return cpus


def _rows(manifest: dict, split: str, limit: int) -> int:
    n = int(manifest["counts"][split])
    return min(n, limit) if limit else n


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    # streaming_split(equal=True) gives each worker train_rows // workers rows; partial batches
    # are dropped so every worker takes the same number of optimizer steps.
    per_worker = train_rows // cfg.train.num_workers
    return per_worker // (cfg.train.batch_size // cfg.train.num_workers)


def build_trainer(cfg: Config, *, name: str, mlflow_run_id: str | None, manifest: dict, callbacks=None):
    """The `TorchTrainer` of one run (also what each Tune trial runs)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rsrefseg.training.ingest import ExactEvalDataConfig, build_datasets
    from rsrefseg.training.worker import train_func

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    loop_config = {
        "config": cfg.to_dict(),
        "mlflow_run_id": mlflow_run_id,
        "steps_per_epoch": steps_per_epoch(cfg, _rows(manifest, cfg.data.train_split, cfg.data.limit)),
    }
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            # A local folder, or the store's pyarrow filesystem (endpoint and region, never
            # credentials): workers upload their checkpoint shards there themselves.
            **storage.ray_storage(runs.storage_root(cfg)),
            failure_config=FailureConfig(max_failures=t.max_failures),
            # The best by val gIoU is kept; Ray Train always keeps the latest too (for resume).
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=cfg.tune.metric, checkpoint_score_order="max"
            ),
            callbacks=callbacks,
        ),
        datasets=build_datasets(cfg, splits={"train": cfg.data.train_split, "val": cfg.data.val_split}, epochs=True),
        dataset_config=ExactEvalDataConfig(split_equal=["train"]),
    )


def run_train(
    cfg: Config,
    *,
    config_file: str | None = None,
    resume: str | None = None,
    name: str | None = None,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> TrainOutcome:
    """Train one model.

    `resume=NAME` continues the run folder NAME with its saved config and MLflow run. `name`
    fixes the run folder name (Tune trials do): a folder that already exists is continued the
    same way, which is how an interrupted sweep resumes an unfinished trial. `run_name` and
    `tags`: the new MLflow run's name (default: the folder name) and extra tags.
    """
    cfg = runs.resolve_paths(cfg)
    root = runs.storage_root(cfg)
    check_storage_root(root, resume)
    saved = runs.open_run(root, resume) if resume else (runs.find_run(root, name) if name else None)
    if saved:
        cfg, name, root = saved.cfg, saved.name, runs.storage_root(saved.cfg)  # the saved storage (absolute)
        if saved.finished:
            print(f"[rsrefseg] run {name} had already finished: nothing to train ({saved.run_dir})", flush=True)
            return TrainOutcome(name=name, run_dir=saved.run_dir, mlflow_run_id=saved.mlflow_run_id,
                                best_checkpoint=saved.run_dir / runs.BEST_DIR, already_finished=True,
                                **saved.finished)
    run_id = saved.mlflow_run_id if saved else None
    name = name or runs.new_run_name(cfg)
    run_dir = root / name
    manifest = preflight(cfg)

    start_ray_with_ingest_cpus(cfg)
    if run_id is None and cfg.tracking.enabled:
        run_id = tracking.start_run(
            cfg,
            run_name=run_name or name.replace("/", "-"),
            config_file=config_file,
            parent_run_id=parent_run_id,
            tags={"rsrefseg.dataset_hash": manifest.get("content_hash", ""), "rsrefseg.job": "train", **(tags or {})},
        )
        tracking.log_dataset(tracking.client(cfg.tracking), run_id, manifest, cfg.data.path,
                             {"train": cfg.data.train_split, "validation": cfg.data.val_split})
    runs.create_run(run_dir, cfg, run_id)
    print(f"[rsrefseg] run {name}: {run_dir}", flush=True)
    if run_id:
        print(f"[rsrefseg] MLflow run {run_id} at {cfg.tracking.uri}", flush=True)

    resume_hint = f"Continue with: rsrefseg train --resume {run_dir}{RESUME_FROM}"
    with tracking.run_lifecycle(cfg.tracking, run_id, continued=saved is not None) as client:
        # Inside the run's lifecycle: caching the splits can fail or be interrupted too.
        trainer = build_trainer(cfg, name=name, mlflow_run_id=run_id, manifest=manifest, callbacks=callbacks)
        try:
            with controller_poll_interval(cfg.train.poll_interval_s):
                result = trainer.fit()
            if result.error:
                raise result.error
        except (KeyboardInterrupt, SystemExit) as exc:
            # Ray Train's own SIGINT handler aborts the run and leaves through sys.exit(0); the
            # CLI turns SIGTERM (`rsrefseg jobs stop`) into KeyboardInterrupt. Either way: say so.
            raise TrainingInterrupted(
                f"run {name} was interrupted ({type(exc).__name__})"
                + (f"; its MLflow run {run_id} is KILLED" if run_id else "") + f".\n{resume_hint}"
            ) from None
        except Exception as exc:
            raise TrainingFailed(f"run {name} failed: {type(exc).__name__}: {exc}\n{resume_hint}") from exc
        outcome = record_best(cfg, result, name=name, run_dir=run_dir, mlflow_run_id=run_id, client=client)
    # Last, once the MLflow run is FINISHED: a run folder marked finished is never trained again.
    runs.finish_run(run_dir, cfg, run_id, best_metrics=outcome.best_metrics, history=outcome.history)
    if cfg.train.register_as:
        from rsrefseg.jobs.register import register_checkpoint

        register_checkpoint(cfg, outcome.best_checkpoint, cfg.train.register_as, source_run_id=run_id)
    return outcome


# Ray Train's controller reads its poll interval from this variable of the driver's environment,
# which Ray passes on to the controller actor (ray.train.v2 ENV_VARS_TO_PROPAGATE).
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextlib.contextmanager
def controller_poll_interval(seconds: float) -> Iterator[None]:
    """Ray Train's controller polls its workers every `seconds` during the block (train.poll_interval_s);
    the driver's environment is put back after it."""
    previous = os.environ.get(POLL_INTERVAL_ENV)
    os.environ[POLL_INTERVAL_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(POLL_INTERVAL_ENV, None)
        else:
            os.environ[POLL_INTERVAL_ENV] = previous


# Where a --resume starts: the run's epoch checkpoints are kept in its folder.
RESUME_FROM = " (it starts after the last finished epoch; from the beginning if none finished)"


def record_best(cfg: Config, result, *, name: str, run_dir: storage.Location, mlflow_run_id: str | None,
                client=None) -> TrainOutcome:
    """Copy the best trainable weights out of Ray's folder (`<run>/best`) and record them, with
    the epoch history, in the MLflow run."""
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get(cfg.tune.metric, float("-inf")))
    with result.checkpoint.as_directory() as latest:
        history = json.loads(Path(latest, runs.STATE_FILE).read_text())["history"]
    # as_directory: the checkpoint itself when local, else a download of it (object storage).
    with best_ckpt.as_directory() as src:
        model_dir = Path(src, runs.MODEL_DIR)
        best = runs.save_best(model_dir, run_dir, last=CONFIG_FILE)
        if client is not None:
            client.log_artifacts(mlflow_run_id, str(model_dir), artifact_path="checkpoints/best")
    if client is not None:
        client.log_text(mlflow_run_id, history_csv(history), "metrics/epochs.csv")
        tracking.log_metrics(
            client, mlflow_run_id,
            {"best/epoch": best_metrics["epoch"], **{f"best/{k[4:]}": v for k, v in best_metrics.items()
                                                  if k.startswith("val/")}},
            step=int(best_metrics["epoch"]),
        )
    return TrainOutcome(
        name=name, run_dir=run_dir, mlflow_run_id=mlflow_run_id, best_checkpoint=best,
        best_metrics=dict(best_metrics), history=history,
    )


def history_csv(history: list[dict]) -> str:
    keys = ["epoch"] + sorted({k for row in history for k in row if k != "epoch"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    return buf.getvalue()
