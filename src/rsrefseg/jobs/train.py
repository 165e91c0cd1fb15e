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
from unittest import mock

from rsrefseg.jobs import session
from rsrefseg.models.checkpoint_folder import CONFIG_FILE
from rsrefseg.platform import paths, runs, storage, tracking
from rsrefseg.platform.config import Config
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError, TrainingFailed, TrainingInterrupted


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
    """Checks that need no Ray: the prepared dataset(s), the model files, what the run must do at
    its end. Returns the manifest (of a mixture: of its first source; `manifests` has them all)."""
    from rsrefseg.datasets.prepare import MANIFEST
    from rsrefseg.models.presets import check_model_files, model_preset

    if cfg.train.register_as and not cfg.tracking.enabled:
        # Checked here, not in the schema: evaluate and predict read a trained run's config
        # (register_as included) with MLflow off, which is fine for them.
        raise ConfigError("train.register_as: registers the model in MLflow, which tracking.enabled=false turns off")
    weights = ("model.sam_checkpoint", "model.siglip_path") if model_preset(cfg.model).pretrained else ()
    # Names this host: a cluster's paths are not the laptop's.
    paths.require(cfg, (*cfg.data.source_path_keys(), *weights))
    session.probe_inputs(cfg, MANIFEST)
    check_model_files(cfg.model)
    manifests = session.check_splits(cfg, (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)))
    rows = epoch_rows(cfg)
    if steps_per_epoch(cfg, rows) < 1:
        where = ", ".join(s.path for s in cfg.data.source_list())
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {rows} training samples of "
            f"{where} split over {cfg.train.num_workers} workers; lower it"
        )
    return next(iter(manifests.values()))


def epoch_rows(cfg: Config) -> int:
    """Training rows of one epoch: data.path's train split, or a mixture's budgets together."""
    from rsrefseg.inference.streams import train_budgets

    return sum(train_budgets(cfg).values())


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    # streaming_split(equal=True) gives each worker train_rows // workers rows; partial batches
    # are dropped so every worker takes the same number of optimizer steps.
    per_worker = train_rows // cfg.train.num_workers
    return per_worker // (cfg.train.batch_size // cfg.train.num_workers)


def build_trainer(cfg: Config, *, name: str, mlflow_run_id: str | None, manifest: dict, callbacks=None):
    """The `TorchTrainer` of one run (also what each Tune trial runs)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rsrefseg.training.ingest import ExactEvalDataConfig
    from rsrefseg.inference.streams import build_datasets
    from rsrefseg.training.worker import train_func

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    loop_config = {
        "config": cfg.to_dict(),
        "mlflow_run_id": mlflow_run_id,
        "steps_per_epoch": steps_per_epoch(cfg, epoch_rows(cfg)),
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
    cfg = session.resolve(cfg)
    root = runs.storage_root(cfg)
    session.probe_run_store(root, resume)
    saved = runs.open_run(root, resume) if resume else (runs.find_run(root, name) if name else None)
    if saved:
        cfg, name = saved.cfg, saved.name
        if saved.finished:
            say(f"run {name} had already finished: nothing to train ({saved.run_dir})")
            return TrainOutcome(name=name, run_dir=saved.run_dir, mlflow_run_id=saved.mlflow_run_id,
                                best_checkpoint=saved.run_dir / runs.BEST_DIR, already_finished=True,
                                **saved.finished)
    name = name or runs.new_run_name(cfg)
    run_dir = runs.storage_root(cfg) / name  # a resumed run: its saved storage (absolute)
    # A resume writes an existing folder: one process at a time. (A Tune trial's folder is its
    # sweep's, which the sweep's driver holds; a new run's name is its own.)
    with runs.lock(run_dir, f"run {name}") if resume else contextlib.nullcontext():
        manifest = preflight(cfg)
        session.start_ray(cfg, ingest=True)
        inputs = session.dataset_inputs(cfg, session.check_splits(cfg, ()),
                                        {"train": cfg.data.train_split, "validation": cfg.data.val_split})
        with session.open_run(cfg, job="train", run_name=run_name or name.replace("/", "-"),
                              run_id=saved.mlflow_run_id if saved else None, parent_run_id=parent_run_id,
                              config_file=config_file, inputs=inputs,
                              tags={"rsrefseg.dataset_hash": session.dataset_hash(inputs), **(tags or {})}) as run:
            runs.create_run(run_dir, cfg, run.run_id)
            say(f"run {name}: {run_dir}")
            if run.run_id:
                say(f"MLflow run {run.run_id} at {paths.redact(cfg.tracking.uri)}")
            outcome = fit(cfg, name=name, run_dir=run_dir, run=run, manifest=manifest, callbacks=callbacks)
        # Last, once the MLflow run is FINISHED: a run folder marked finished is never trained again.
        runs.finish_run(run_dir, cfg, run.run_id, best_metrics=outcome.best_metrics, history=outcome.history)
    if cfg.train.register_as:
        from rsrefseg.jobs.register import register_checkpoint

        register_checkpoint(cfg, outcome.best_checkpoint, cfg.train.register_as, source_run_id=run.run_id)
    return outcome


def fit(cfg: Config, *, name: str, run_dir: storage.Location, run: session.Run, manifest: dict,
        callbacks: list | None) -> TrainOutcome:
    """Ray Train's fit of the run, inside its MLflow lifecycle (caching the splits can fail or be
    interrupted too), then its best checkpoint recorded."""
    resume_hint = f"Continue with: rsrefseg train --resume {run_dir}{RESUME_FROM}"
    trainer = build_trainer(cfg, name=name, mlflow_run_id=run.run_id, manifest=manifest, callbacks=callbacks)
    try:
        with controller_poll_interval(cfg.train.poll_interval_s):
            result = trainer.fit()
        if result.error:
            raise result.error
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ray Train's own SIGINT handler aborts the run and leaves through sys.exit(0); the
        # session turns SIGTERM (`rsrefseg jobs stop`) into KeyboardInterrupt. Either way: say so.
        raise TrainingInterrupted(
            f"run {name} was interrupted ({type(exc).__name__})"
            + (f"; its MLflow run {run.run_id} is KILLED" if run.run_id else "") + f".\n{resume_hint}"
        ) from None
    except Exception as exc:
        raise TrainingFailed(f"run {name} failed: {type(exc).__name__}: {exc}\n{resume_hint}") from exc
    return record_best(cfg, result, name=name, run_dir=run_dir, mlflow_run_id=run.run_id, client=run.client)


# Ray Train's controller reads its poll interval from this variable of the driver's environment,
# which Ray passes on to the controller actor (ray.train.v2 ENV_VARS_TO_PROPAGATE).
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def controller_poll_interval(seconds: float) -> contextlib.AbstractContextManager:
    """Ray Train's controller polls its workers every `seconds` during the block (train.poll_interval_s);
    the driver's environment is put back after it."""
    return mock.patch.dict(os.environ, {POLL_INTERVAL_ENV: f"{seconds:g}"})


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
