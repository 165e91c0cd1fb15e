"""`rsrefseg train`: the driver side of a distributed training run.

Validates everything it can before taking Ray resources, builds the Ray Data streams, creates the
MLflow run, and runs a Ray Train `TorchTrainer` whose workers execute `train_loop.train_func`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rsrefseg.platform import paths, tracking
from rsrefseg.platform.config import Config, ConfigError
from rsrefseg.platform.errors import TrainingFailed, TrainingInterrupted  # noqa: F401 (raised here, caught by the CLI)
from rsrefseg.platform.ray_session import init_ray, joins_existing_ray

RUN_INFO = "rsrefseg_run.json"  # beside Ray Train's run folder: the MLflow run id and config
BEST_DIR = "best"  # the best trainable-weights checkpoint, copied out of Ray's folder


@dataclass
class TrainOutcome:
    name: str
    run_dir: Path
    mlflow_run_id: str | None
    best_checkpoint: Path  # a model checkpoint folder (weights.safetensors + config.yaml)
    best_metrics: dict
    history: list[dict]
    # True when the run had already finished and nothing was trained again (a resumed finished
    # run, or a Tune trial whose training ended just before the sweep was interrupted).
    already_finished: bool = False


@dataclass
class SavedRun:
    """What a run folder's RUN_INFO records."""

    cfg: Config
    name: str  # relative to the config's storage root, e.g. `<sweep>/trials/<trial id>`
    mlflow_run_id: str | None
    finished: dict | None  # {"best_metrics", "history"} once finish_run has completed


def storage_root(cfg: Config) -> Path:
    return Path(paths.resolve(cfg.train.storage_path, paths.project_root(cfg.paths.root)))


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


def start_ray_with_ingest_cpus(cfg: Config) -> float:
    """Start or join Ray, refusing a job whose train workers would leave Ray Data no CPU (one
    run's workers; Tune then fits its trials to what is left). A local Ray's size is known before
    it starts, so that is checked first and nothing starts in vain; a joined cluster's after.
    Returns the cluster's CPUs."""
    from rsrefseg.platform.capacity import check_ingest_capacity, cluster_cpus, local_cpus

    if not joins_existing_ray(cfg.cluster):
        check_ingest_capacity(cfg, local_cpus(cfg), where="the local Ray this job starts (cluster.num_cpus)")
    where = init_ray(cfg.cluster)
    cpus = cluster_cpus()  # a joined Ray's own CPUs, whatever cluster.num_cpus says
    check_ingest_capacity(cfg, cpus, where=where)
    return cpus


def _rows(manifest: dict, split: str, limit: int) -> int:
    n = int(manifest["counts"][split])
    return min(n, limit) if limit else n


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    # streaming_split(equal=True) gives each worker train_rows // workers rows; partial batches
    # are dropped so every worker takes the same number of optimizer steps.
    per_worker = train_rows // cfg.train.num_workers
    return per_worker // (cfg.train.batch_size // cfg.train.num_workers)


def build_datasets(cfg: Config, *, splits: dict[str, str]) -> dict:
    """Ray Data streams for the named splits ({"train": "train", "val": "val"})."""
    from rsrefseg.datasets.pipeline import preprocess, read_split
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.tokenizer import load_tokenizer

    sizes = input_sizes(cfg.model, cfg.data.label_size)
    tokenizer = load_tokenizer(cfg.model)
    out = {}
    for name, split in splits.items():
        is_train = name == "train"
        # Training reads its shards in a new order every epoch; evaluation reads them in order.
        ds = read_split(cfg.data.path, split, limit=cfg.data.limit,
                        shuffle_seed=cfg.train.seed if is_train else None)
        out[name] = preprocess(
            ds,
            sizes,
            tokenizer,
            augment=cfg.data.augment and is_train,
            shuffle_phrases=cfg.data.shuffle_phrases and is_train,
            seed=cfg.train.seed,
            original_masks=not is_train,  # val/eval score at each image's own size
        )
    return out


def build_trainer(cfg: Config, *, name: str, mlflow_run_id: str | None, manifest: dict, callbacks=None):
    """The `TorchTrainer` of one run (also what each Tune trial runs)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rsrefseg.jobs.ingest_config import ExactEvalDataConfig
    from rsrefseg.jobs.train_loop import train_func

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
            storage_path=str(storage_root(cfg)),
            failure_config=FailureConfig(max_failures=t.max_failures),
            # The best by val gIoU is kept; Ray Train always keeps the latest too (for resume).
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=cfg.tune.metric, checkpoint_score_order="max"
            ),
            callbacks=callbacks,
        ),
        datasets=build_datasets(cfg, splits={"train": cfg.data.train_split, "val": cfg.data.val_split}),
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
    cfg = resolve_paths(cfg)
    root = storage_root(cfg)
    saved = None
    if resume:
        saved = _load_run_info(root, resume)
        cfg = saved.cfg
    elif name and (root / name / RUN_INFO).is_file():
        saved = _load_run_info(root, name)
    run_id = saved.mlflow_run_id if saved else None
    continuing = run_id is not None
    if saved:
        name, root = saved.name, storage_root(saved.cfg)  # the saved storage (absolute)
        if saved.finished:
            print(f"[rsrefseg] run {name} had already finished: nothing to train ({root / name})", flush=True)
            return TrainOutcome(name=name, run_dir=root / name, mlflow_run_id=run_id,
                                best_checkpoint=root / name / BEST_DIR, already_finished=True,
                                **saved.finished)
    name = name or f"{cfg.tracking.run_name or 'train'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
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
    _write_run_info(root / name, cfg, run_id)
    print(f"[rsrefseg] run {name}: {root / name}", flush=True)
    if run_id:
        print(f"[rsrefseg] MLflow run {run_id} at {cfg.tracking.uri}", flush=True)

    if continuing:  # a FAILED (or killed) run is running again
        c = tracking.client(cfg.tracking)
        c.update_run(run_id, status="RUNNING")
        if tracking.STOPPED_EARLY_TAG in c.get_run(run_id).data.tags:  # a Tune trial continued by a resume
            c.delete_tag(run_id, tracking.STOPPED_EARLY_TAG)

    trainer = build_trainer(cfg, name=name, mlflow_run_id=run_id, manifest=manifest, callbacks=callbacks)
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ray Train's own SIGINT handler aborts the run and leaves through sys.exit(0); the CLI
        # turns SIGTERM (`rsrefseg jobs stop`) into KeyboardInterrupt. Either way: say so.
        if run_id:
            tracking.client(cfg.tracking).set_terminated(run_id, status="KILLED")
        raise TrainingInterrupted(
            f"run {name} was interrupted ({type(exc).__name__})"
            + (f"; its MLflow run {run_id} is KILLED" if run_id else "")
            + f".\nContinue with: rsrefseg train --resume {root / name}{RESUME_FROM}"
        ) from None
    except Exception as exc:
        if run_id:
            tracking.client(cfg.tracking).set_terminated(run_id, status="FAILED")
        raise TrainingFailed(
            f"run {name} failed: {type(exc).__name__}: {exc}\n"
            f"Continue with: rsrefseg train --resume {root / name}{RESUME_FROM}"
        ) from exc
    outcome = finish_run(cfg, result, name=name, run_dir=root / name, mlflow_run_id=run_id)
    if cfg.train.register_as:
        from rsrefseg.jobs.register import register_checkpoint

        register_checkpoint(cfg, outcome.best_checkpoint, cfg.train.register_as, source_run_id=run_id)
    return outcome


# Where a --resume starts: the run's epoch checkpoints are kept in its folder.
RESUME_FROM = " (it starts after the last finished epoch; from the beginning if none finished)"


def finish_run(cfg: Config, result, *, name: str, run_dir: Path, mlflow_run_id: str | None) -> TrainOutcome:
    """Copy the best trainable weights out of Ray's folder and record them in MLflow."""
    from rsrefseg.jobs.train_loop import MODEL_DIR, STATE_FILE

    if result.error:
        raise result.error
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get(cfg.tune.metric, float("-inf")))
    with result.checkpoint.as_directory() as latest:
        history = json.loads(Path(latest, STATE_FILE).read_text())["history"]
    best = run_dir / BEST_DIR
    with best_ckpt.as_directory() as src:
        _replace_dir(Path(src, MODEL_DIR), best)
    if mlflow_run_id:
        c = tracking.client(cfg.tracking)
        c.log_artifacts(mlflow_run_id, str(best), artifact_path="checkpoints/best")
        c.log_text(mlflow_run_id, history_csv(history), "metrics/epochs.csv")
        tracking.log_metrics(
            c, mlflow_run_id,
            {"best/epoch": best_metrics["epoch"], **{f"best/{k[4:]}": v for k, v in best_metrics.items()
                                                  if k.startswith("val/")}},
            step=int(best_metrics["epoch"]),
        )
        c.set_terminated(mlflow_run_id, status="FINISHED")
    # Last: a run folder marked finished is never trained again.
    _write_run_info(run_dir, cfg, mlflow_run_id, finished={"best_metrics": dict(best_metrics), "history": history})
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


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` atomically: copy beside, then rename over."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def resolve_paths(cfg: Config) -> Config:
    """Every path and the tracking store made absolute on this machine, against paths.root
    (Ray workers and Tune trials run in other working directories, or on other machines)."""
    return tracking.resolved(paths.absolute(cfg))


def _write_run_info(run_dir: Path, cfg: Config, run_id: str | None, finished: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_INFO + ".tmp")
    info = {"mlflow_run_id": run_id, "config": cfg.to_dict()}
    if finished is not None:
        info["finished"] = finished
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / RUN_INFO)


def named_folder(root: Path, ref: str, marker: str) -> Path:
    """The folder a `--resume REF` names: a path as typed (absolute, or relative to here or to
    the project folder, as in `runs/<name>`) when it holds `marker`, else the name REF under the
    storage root `root`. (A submitted job runs in Ray's copy of the code, not the project folder.)"""
    for path in (Path(ref), paths.project_root() / ref):
        if (path / marker).is_file():
            return path.resolve()
    return root / ref


def _load_run_info(root: Path, name: str) -> SavedRun:
    run_dir = named_folder(root, name, RUN_INFO)
    info = run_dir / RUN_INFO
    if not info.is_file():
        known = sorted(p.parent.name for p in root.glob(f"*/{RUN_INFO}")) if root.is_dir() else []
        raise ConfigError(
            f"--resume {name}: no run folder {run_dir} (expected {info}); "
            f"runs under {root}: {', '.join(known) or 'none'}"
        )
    data = json.loads(info.read_text())
    cfg = Config.from_dict(data["config"], source=str(info))
    try:
        # The name relative to the saved storage root, nested parts kept (a Tune trial is
        # `<sweep>/trials/<id>`): Ray Train finds the run's checkpoints at storage_path/name.
        name = run_dir.resolve().relative_to(storage_root(cfg).resolve()).as_posix()
    except ValueError:  # the folder was moved: continue it where it is now
        cfg = cfg.replace({"train.storage_path": str(run_dir.resolve().parent)})
        name = run_dir.name
    return SavedRun(cfg=cfg, name=name, mlflow_run_id=data.get("mlflow_run_id"), finished=data.get("finished"))
