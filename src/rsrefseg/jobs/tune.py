"""`rsrefseg tune`: a Ray Tune sweep whose trials are real distributed training runs.

Each trial runs the train job's `TorchTrainer` (DeepSpeed ZeRO-2 workers) from inside a Tune
function trainable, the Ray Train V2 way: `TuneReportCallback` forwards every epoch's metrics
to Tune (for ASHA). MLflow: one parent run per sweep, one nested child run per trial with the
same flat params as a train run; the parent holds the ablation table (Markdown, CSV, figure).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rsrefseg.jobs import sweep as sweeps
from rsrefseg.platform import tracking
from rsrefseg.platform.config import Config, ConfigError

SWEEP_INFO = "rsrefseg_sweep.json"
DEFAULT_SWEEP = "configs/sweeps/ablation.yaml"
TRIAL_DRIVER_CPU = 0.01  # see run_tune


def trial_config(base: Config, setting: dict) -> Config:
    """A trial's config: the base, the trial's overrides, and the tune section's resources."""
    t = base.tune
    resources = {
        "train.num_workers": t.num_workers or base.train.num_workers,
        "train.cpus_per_worker": t.cpus_per_worker,
        "train.use_gpu": t.gpus_per_worker > 0,
    }
    if t.gpus_per_worker > 0:
        resources["train.gpus_per_worker"] = t.gpus_per_worker
    return base.replace({**resources, **setting})


def sweep_trial(config: dict) -> None:
    """The Tune trainable: one trial = one distributed training run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rsrefseg.jobs.train import run_train

    base = Config.from_dict(config["base"])
    setting = config["train_loop_config"]["overrides"]
    cfg = trial_config(base, setting)
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"{config['sweep_name']}/trials/{trial_id}"
    try:
        outcome = run_train(cfg, name=name, parent_run_id=config["parent_run_id"], callbacks=[TuneReportCallback()])
    except Exception as exc:
        _record_failed_trial(cfg, name, config["parent_run_id"], exc)
        raise
    if outcome.already_finished:
        # Its training ended just before the sweep was interrupted, before Tune recorded the
        # trial as done: Tune restarts it with an empty history, so give it back the recorded
        # epochs instead of training (and touching its finished MLflow run) again.
        for epoch_metrics in outcome.history:
            ray.tune.report(epoch_metrics)


def _record_failed_trial(cfg: Config, name: str, parent_run_id: str | None, exc: Exception) -> None:
    """A trial that failed before its MLflow run existed still shows up, as FAILED, in the UI."""
    from rsrefseg.jobs.train import RUN_INFO, storage_root

    if not parent_run_id or not cfg.tracking.enabled:
        return
    run_dir = storage_root(tracking.resolved(cfg)) / name
    if (run_dir / RUN_INFO).is_file():
        return  # run_train created the run and already marked it FAILED
    run_id = tracking.start_run(cfg, run_name=name.replace("/", "-"), parent_run_id=parent_run_id,
                                tags={"rsrefseg.job": "train", "rsrefseg.error": str(exc)[:4000]})
    tracking.client(cfg.tracking).set_terminated(run_id, status="FAILED")


def run_tune(
    cfg: Config,
    *,
    sweep_file: str | None = None,
    resume: str | None = None,
    config_file: str | None = None,
) -> list[dict]:
    """Run (or resume) a sweep; return the ablation table rows."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from rsrefseg.jobs.train import _absolute_paths, preflight, start_ray_with_ingest_cpus, storage_root
    from rsrefseg.platform.capacity import concurrent_trials

    cfg = _absolute_paths(cfg)
    root = storage_root(cfg)
    if resume:
        info_path = sweep_folder(root, resume) / SWEEP_INFO
        sweep_dir = info_path.parent
        info = json.loads(info_path.read_text())
        cfg = Config.from_dict(info["base"], source=str(info_path))
        sweep = sweeps.load_sweep(info["sweep_file_copy"], cfg)
        name, parent_run_id = sweep_dir.name, info["parent_run_id"]
    else:
        sweep_file = sweep_file or DEFAULT_SWEEP
        sweep = sweeps.load_sweep(sweep_file, cfg)
        name = cfg.tune.name or f"sweep-{Path(sweep_file).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir = root / name
        parent_run_id = None
    preflight(cfg)  # the shared dataset and model files, before any Ray resource

    # Trials at once: as many as leave Ray Data its CPUs (fewer than asked, with a note).
    trial = trial_config(cfg, {})
    cpus = start_ray_with_ingest_cpus(trial)
    concurrency = concurrent_trials(trial, cpus, driver_cpu=TRIAL_DRIVER_CPU, where="the Ray cluster")
    if not resume:
        if cfg.tracking.enabled:
            parent_run_id = tracking.start_run(cfg, run_name=name, config_file=config_file,
                                               tags={"rsrefseg.job": "tune", "rsrefseg.sweep": sweep.source})
            tracking.client(cfg.tracking).log_artifact(parent_run_id, sweep.source, artifact_path="config")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        copy = sweep_dir / "sweep.yaml"
        copy.write_text(Path(sweep.source).read_text())
        _write_json(sweep_dir / SWEEP_INFO, {"base": cfg.to_dict(), "parent_run_id": parent_run_id,
                                             "sweep_file": sweep.source, "sweep_file_copy": str(copy)})
    settings = sweep.trials()
    print(f"[rsrefseg] sweep {name}: {len(settings)} trials ({sweep.mode}) -> {sweep_dir}", flush=True)

    # A trial is only the driver of its TorchTrainer, which reserves the workers' resources itself
    # (tune.cpus_per_worker / gpus_per_worker); the driver holds a token share of a CPU (Ray
    # refuses an empty request), so trials in parallel are bounded by tune.max_concurrent_trials
    # and by what the cluster can give their workers, not by driver slots.
    trainable = ray.tune.with_resources(sweep_trial, {"CPU": TRIAL_DRIVER_CPU})
    if resume:
        tuner = ray.tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
    else:
        scheduler = None
        if cfg.tune.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                                      reduction_factor=cfg.tune.reduction_factor)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={
                "base": cfg.to_dict(),
                "sweep_name": name,
                "parent_run_id": parent_run_id,
                "train_loop_config": {"overrides": ray.tune.grid_search(settings)},
            },
            tune_config=ray.tune.TuneConfig(
                metric=cfg.tune.metric, mode="max", scheduler=scheduler,
                max_concurrent_trials=concurrency or None,
            ),
            run_config=ray.tune.RunConfig(
                name=name, storage_path=str(root),
                # A failing trial is retried tune.max_failures times, then reported, and the
                # sweep goes on with the others.
                failure_config=ray.tune.FailureConfig(max_failures=cfg.tune.max_failures, fail_fast=False),
            ),
        )
    grid = tuner.fit()
    results = collect_results(grid, cfg)
    _close_stopped_runs(cfg, sweep_dir, results)
    rows = sweeps.table_rows(sweep, results)
    _publish_table(cfg, parent_run_id, sweep_dir, rows)
    return rows


def sweep_folder(root: Path, resume: str) -> Path:
    """The sweep folder `--resume` names (a path as typed, or a sweep name under `root`)."""
    from rsrefseg.jobs.train import named_folder

    sweep_dir = named_folder(root, resume, SWEEP_INFO)
    if not (sweep_dir / SWEEP_INFO).is_file():
        known = sorted(p.parent.name for p in root.glob(f"*/{SWEEP_INFO}")) if root.is_dir() else []
        raise ConfigError(f"--resume {resume}: {sweep_dir / SWEEP_INFO} not found; "
                          f"sweeps under {root}: {', '.join(known) or 'none'}")
    return sweep_dir


def collect_results(grid, base: Config) -> list[sweeps.TrialResult]:
    """Each trial's best epoch (by `tune.metric`) from the epochs it reported to Tune; a trial that
    reported fewer epochs than its `train.epochs` was stopped early by the scheduler."""
    metric = base.tune.metric
    out = []
    for result in grid:
        setting = result.config["train_loop_config"]["overrides"]
        trial_id = str((result.metrics or {}).get("trial_id", ""))
        frame = result.metrics_dataframe
        if result.error is not None:
            out.append(sweeps.TrialResult(setting=setting, status="failed", error=str(result.error)[:500],
                                          trial_id=trial_id))
            continue
        if frame is None or metric not in frame or frame[metric].isna().all():
            out.append(sweeps.TrialResult(setting=setting, status="pending", trial_id=trial_id))
            continue
        best = frame.loc[frame[metric].idxmax()]
        metrics = {c: float(best[f"val/{c}"]) for c in sweeps.METRIC_COLUMNS if f"val/{c}" in best}
        ran = int(frame["epoch"].max())
        status = "finished" if ran >= trial_config(base, setting).train.epochs else "stopped"
        out.append(sweeps.TrialResult(setting=setting, status=status, metrics=metrics,
                                      best_epoch=int(best["epoch"]), trial_id=trial_id))
    return out


def _close_stopped_runs(cfg: Config, sweep_dir: Path, results: list[sweeps.TrialResult]) -> None:
    """A trial the scheduler stopped never reached finish_run: end its MLflow run as KILLED, so the
    UI does not show it running forever, and say why."""
    from rsrefseg.jobs.train import RUN_INFO

    stopped = [r for r in results if r.status == "stopped" and r.trial_id]
    if not stopped or not cfg.tracking.enabled:
        return
    c = tracking.client(cfg.tracking)
    for r in stopped:
        info = sweep_dir / "trials" / r.trial_id / RUN_INFO  # sweep_trial's run folder
        run_id = json.loads(info.read_text()).get("mlflow_run_id") if info.is_file() else None
        if run_id:
            c.set_tag(run_id, "rsrefseg.stopped_early", f"by the {cfg.tune.scheduler} scheduler")
            c.set_terminated(run_id, status="KILLED")


def _publish_table(cfg: Config, parent_run_id: str | None, sweep_dir: Path, rows: list[dict]) -> None:
    markdown, csv_text = sweeps.to_markdown(rows), sweeps.to_csv(rows)
    _write_text(sweep_dir / "ablation.md", markdown + "\n")
    _write_text(sweep_dir / "ablation.csv", csv_text)
    fig = sweeps.ablation_figure(rows)
    tmp_png = sweep_dir / "ablation.png.tmp"
    fig.savefig(tmp_png, dpi=120, format="png")
    os.replace(tmp_png, sweep_dir / "ablation.png")
    if parent_run_id and cfg.tracking.enabled:
        c = tracking.client(cfg.tracking)
        c.log_text(parent_run_id, markdown + "\n", "ablation/ablation.md")
        c.log_text(parent_run_id, csv_text, "ablation/ablation.csv")
        c.log_figure(parent_run_id, fig, "ablation/ablation.png")
        failed = sum(r["status"] == "failed" for r in rows)
        c.set_tag(parent_run_id, "rsrefseg.failed_rows", str(failed))
        c.set_terminated(parent_run_id, status="FINISHED")
    import matplotlib.pyplot as plt

    plt.close(fig)
    print("\nAblation table (val split, percent; best epoch per trial):")
    print(markdown)
    print(f"\n[rsrefseg] table: {sweep_dir / 'ablation.md'} (also in the sweep's MLflow parent run)")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2))
