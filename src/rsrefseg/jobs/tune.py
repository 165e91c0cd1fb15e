"""`rsrefseg tune`: a Ray Tune sweep whose trials are real distributed training runs.

Each trial runs the train job's `TorchTrainer` (DeepSpeed ZeRO-2 workers) from inside a Tune
function trainable, the Ray Train V2 way: `TuneReportCallback` forwards every epoch's metrics
to Tune (for ASHA). MLflow: one parent run per sweep, one nested child run per trial with the
same flat params as a train run; the parent holds the ablation table (Markdown, CSV, figure).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass

from rsrefseg.jobs import session
from rsrefseg.platform import console, runs, signals, storage, tracking
from rsrefseg.platform.atomic import write_bytes, write_text
from rsrefseg.platform.config import Config
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError, TrainingInterrupted
from rsrefseg.platform.metric_names import METRIC_NAMES
from rsrefseg.training import sweep as sweeps

DEFAULT_SWEEP = "ablation"  # the shipped configs/sweeps/ablation.yaml (platform/recipes.py)
TRIAL_DRIVER_CPU = 0.01  # see run_tune


def trial_config(base: Config, setting: dict) -> Config:
    """A trial's config: the base, the trial's overrides, and its resources: the train section's,
    unless tune.* sets them (a GPU recipe's trials train on GPUs with nothing repeated)."""
    t = base.tune
    resources: dict = {}
    if t.num_workers:
        resources["train.num_workers"] = t.num_workers
    if t.cpus_per_worker:
        resources["train.cpus_per_worker"] = t.cpus_per_worker
    if t.gpus_per_worker >= 0:
        resources["train.use_gpu"] = t.gpus_per_worker > 0
        if t.gpus_per_worker > 0:
            resources["train.gpus_per_worker"] = t.gpus_per_worker
    return base.replace({**resources, **setting})


def setting_key(setting: dict) -> str:
    """A setting as a dict key (Tune hands each trial its setting, not its index)."""
    return json.dumps(setting, sort_keys=True, default=str)


def sweep_trial(config: dict) -> None:
    """The Tune trainable: one trial = one distributed training run."""
    import ray.tune

    from rsrefseg.jobs.train import run_train

    base = Config.from_dict(config["base"])
    setting = config["train_loop_config"]["overrides"]
    cfg = trial_config(base, setting)
    run_name = config.get("run_names", {}).get(setting_key(setting), "trial")  # sweeps begun before names: "trial"
    trial_id = ray.tune.get_context().get_trial_id()
    name = runs.trial_name(config['sweep_name'], trial_id)
    try:
        outcome = run_train(cfg, name=name, parent_run_id=config["parent_run_id"],
                            callbacks=[_report_all_but_last_epoch(cfg.train.epochs)],
                            run_name=run_name, tags={"rsrefseg.trial_id": trial_id})
    except Exception as exc:
        _record_failed_trial(cfg, name, config["parent_run_id"], exc, run_name=run_name, trial_id=trial_id)
        raise
    if outcome.already_finished:
        # Its training ended just before the sweep was interrupted, before Tune recorded the
        # trial as done: Tune restarts it with an empty history, so give it back the recorded
        # epochs instead of training (and touching its finished MLflow run) again.
        for epoch_metrics in outcome.history:
            ray.tune.report(epoch_metrics)
    else:
        # The last epoch, held back until the run has its best checkpoint and is FINISHED in MLflow.
        ray.tune.report(outcome.history[-1])


def _report_all_but_last_epoch(last_epoch: int):
    """Ray Train's TuneReportCallback (every epoch's metrics to Tune, for ASHA), minus the last
    epoch. A scheduler stops a trial as soon as it reports its final epoch (ASHA's max_t), and
    Tune then kills the trial's actor within seconds, in the middle of its finishing: sweep_trial
    reports that epoch itself once the run is complete."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportAllButLast(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("epoch") == last_epoch:
                return
            super().after_report(run_context, metrics, checkpoint)

    return ReportAllButLast()


def _record_failed_trial(cfg: Config, name: str, parent_run_id: str | None, exc: Exception, *, run_name: str,
                         trial_id: str) -> None:
    """A trial that failed before its MLflow run existed still shows up, as FAILED, in the UI."""
    if not parent_run_id or not cfg.tracking.enabled:
        return
    if runs.find_run(runs.storage_root(cfg), name):  # cfg: the sweep's resolved base, a trial's overrides
        return  # run_train created the run and its lifecycle already marked it FAILED
    # A run of its own, with the trial's params, ended FAILED by its lifecycle like any other.
    tags = {"rsrefseg.trial_id": trial_id, "rsrefseg.error": str(exc)[:4000]}
    with contextlib.suppress(_TrialFailed), session.open_run(cfg, job="train", run_name=run_name,
                                                             parent_run_id=parent_run_id, tags=tags):
        raise _TrialFailed


class _TrialFailed(Exception):
    """Leaves a failed trial's stand-in run through its lifecycle, which ends it FAILED."""


@dataclass
class SweepPlan:
    """What a sweep runs: its base config, its trials' settings and where it lives."""

    cfg: Config
    sweep: sweeps.Sweep
    name: str
    sweep_dir: storage.Location
    parent_run_id: str | None = None  # a resumed sweep's MLflow parent run


def run_tune(
    cfg: Config,
    *,
    sweep_file: str | None = None,
    resume: str | None = None,
    config_file: str | None = None,
) -> list[dict]:
    """Run (or resume) a sweep; return the ablation table rows."""
    from rsrefseg.jobs.train import preflight
    from rsrefseg.platform.capacity import concurrent_trials

    cfg = session.resolve(cfg)
    root = runs.storage_root(cfg)
    session.probe_run_store(root, resume)
    plan = _resumed_sweep(root, resume) if resume else _new_sweep(cfg, root, sweep_file or DEFAULT_SWEEP)
    cfg = plan.cfg
    with runs.lock(plan.sweep_dir, f"sweep {plan.name}"):  # one driver per sweep folder (its trials too)
        preflight(cfg)  # the shared dataset and model files, before any Ray resource
        # Trials at once: as many as leave Ray Data its CPUs (fewer than asked, with a note).
        trial = trial_config(cfg, {})
        cpus = session.start_ray(trial, ingest=True)
        concurrency = concurrent_trials(trial, cpus, driver_cpu=TRIAL_DRIVER_CPU, where="the Ray cluster")
        with session.open_run(cfg, job="tune", run_name=plan.name, run_id=plan.parent_run_id, create=not resume,
                              config_file=config_file, tags={"rsrefseg.sweep": plan.sweep.source}) as run:
            if not resume:
                if run.client is not None:
                    run.client.log_artifact(run.run_id, plan.sweep.source, artifact_path="config")
                runs.create_sweep(plan.sweep_dir, cfg, plan.sweep.source, run.run_id)
            settings = plan.sweep.trials()
            say(f"sweep {plan.name}: {len(settings)} trials ({plan.sweep.mode}) -> {plan.sweep_dir}")
            tuner = _tuner(plan, root, run.run_id, settings, concurrency, resume=bool(resume))
            with signals.sigterm_as_sigint(), _without_tuner_restore_hint():
                grid = tuner.fit()
            rows = _finish_sweep(plan, grid, settings, run)
    return rows


def _new_sweep(cfg: Config, root: storage.Location, sweep_file: str) -> SweepPlan:
    sweep = sweeps.load_sweep(sweep_file, cfg)
    name = runs.new_sweep_name(cfg, sweep_file)
    if (root / name / runs.SWEEP_INFO).is_file():  # a fixed tune.name: never over another sweep's records
        raise ConfigError(f"tune.name: a sweep named {name} already exists in {root / name}; continue it with "
                          f"`rsrefseg tune --resume {root / name}`, or give this one another tune.name")
    return SweepPlan(cfg, sweep, name, root / name)


def _resumed_sweep(root: storage.Location, resume: str) -> SweepPlan:
    saved = runs.open_sweep(root, resume)
    sweep = sweeps.load_sweep(str(saved.sweep_file_copy), saved.base)
    return SweepPlan(saved.base, sweep, saved.name, saved.sweep_dir, saved.parent_run_id)


def _tuner(plan: SweepPlan, root: storage.Location, parent_run_id: str | None, settings: list[dict],
           concurrency: int, *, resume: bool):
    """A new Tuner over the settings, or the interrupted sweep's, restored from its folder."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    cfg = plan.cfg
    # A trial is only the driver of its TorchTrainer, which reserves the workers' resources itself
    # (train.* or tune.* cpus_per_worker / gpus_per_worker); the driver holds a token share of a CPU (Ray
    # refuses an empty request), so trials in parallel are bounded by tune.max_concurrent_trials
    # and by what the cluster can give their workers, not by driver slots.
    trainable = ray.tune.with_resources(sweep_trial, {"CPU": TRIAL_DRIVER_CPU})
    if resume:
        where = storage.ray_storage(plan.sweep_dir)
        return ray.tune.Tuner.restore(where["storage_path"], trainable=trainable, resume_unfinished=True,
                                      resume_errored=False, restart_errored=False,
                                      storage_filesystem=where.get("storage_filesystem"))
    scheduler = None
    if cfg.tune.scheduler == "asha":
        # max_t: the longest trial's epochs (a sweep may vary train.epochs); a trial that ends
        # sooner reports its own last epoch when its run is complete.
        max_t = max(trial_config(cfg, s).train.epochs for s in settings)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=cfg.tune.grace_period,
                                  reduction_factor=cfg.tune.reduction_factor)
    return ray.tune.Tuner(
        trainable,
        param_space={
            "base": cfg.to_dict(),
            "sweep_name": plan.name,
            "parent_run_id": parent_run_id,
            "run_names": {setting_key(s): plan.sweep.run_name(s) for s in settings},
            "train_loop_config": {"overrides": ray.tune.grid_search(settings)},
        },
        tune_config=ray.tune.TuneConfig(metric=cfg.tune.metric, mode="max", scheduler=scheduler,
                                        max_concurrent_trials=concurrency or None),
        run_config=ray.tune.RunConfig(
            name=plan.name, **storage.ray_storage(root),
            # Tune's status tables are its own output: the log file's, unless --verbose.
            verbose=None if console.verbose() else 0,
            # A failing trial is retried tune.max_failures times, then reported, and the
            # sweep goes on with the others.
            failure_config=ray.tune.FailureConfig(max_failures=cfg.tune.max_failures, fail_fast=False),
        ),
    )


def _finish_sweep(plan: SweepPlan, grid, settings: list[dict], run: session.Run) -> list[dict]:
    """The table of what ran, published; no trial run left RUNNING. An interrupted sweep (Tune
    ends its loop early only then: Ctrl-C, a stopped job) raises SweepInterrupted after that."""
    results = collect_results(grid, plan.cfg)
    _settle_trial_runs(plan.cfg, plan.sweep_dir, results)
    rows = sweeps.table_rows(plan.sweep, results)
    _publish_table(run.client, run.run_id, plan.sweep_dir, rows)
    if len(results) < len(settings) or any(r.status in ("interrupted", "pending") for r in results):
        raise SweepInterrupted(
            f"sweep {plan.name} was interrupted"
            + (f"; its MLflow run {run.run_id} and its unfinished trials' runs are KILLED" if run.run_id else "")
            + f".\nFinished trials are kept and unfinished ones continue from their last epoch with: "
            f"rsrefseg tune --resume {plan.sweep_dir}"
        )
    return rows


class SweepInterrupted(TrainingInterrupted):
    """Ctrl-C or a stopped job ended the sweep early; `rsrefseg tune --resume` continues it."""


class _NoTunerRestoreHint(logging.Filter):
    """Tune ends an interrupted sweep by pointing to its Python API (`Tuner.restore(...)`); the
    command prints `rsrefseg tune --resume` instead, which also continues the MLflow runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


@contextlib.contextmanager
def _without_tuner_restore_hint():
    """During `Tuner.fit` (Ctrl-C is Tune's: it saves the sweep's state and stops the trials, then
    fit returns; `signals.sigterm_as_sigint` makes SIGTERM do the same): Tune's own resume hint,
    which names its Python API, is left out."""
    tune_log = logging.getLogger("ray.tune.tune")
    hint_filter = _NoTunerRestoreHint()
    tune_log.addFilter(hint_filter)
    try:
        yield
    finally:
        tune_log.removeFilter(hint_filter)


def collect_results(grid, base: Config) -> list[sweeps.TrialResult]:
    """Each trial's best epoch (by `tune.metric`) from the epochs it reported to Tune. A trial that
    reported fewer epochs than its `train.epochs` was stopped early by the scheduler when Tune
    marked its last result done, else interrupted (the sweep was, and its resume continues it)."""
    metric = base.tune.metric
    out = []
    for result in grid:
        # A trial interrupted before its first report has no config in its result (and so no
        # row of its own: the table shows its setting as pending).
        setting = (result.config or {}).get("train_loop_config", {}).get("overrides", {})
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
        metrics = {c: float(best[f"val/{c}"]) for c in METRIC_NAMES if f"val/{c}" in best}
        ran = int(frame["epoch"].max())
        if ran >= trial_config(base, setting).train.epochs:
            status = "finished"
        else:
            status = "stopped" if (result.metrics or {}).get("done", True) else "interrupted"
        out.append(sweeps.TrialResult(setting=setting, status=status, metrics=metrics,
                                      best_epoch=int(best["epoch"]), trial_id=trial_id))
    return out


def _settle_trial_runs(cfg: Config, sweep_dir: storage.Location, results: list[sweeps.TrialResult]) -> None:
    """Once Tune's loop is over no trial's MLflow run is left RUNNING. A trial the scheduler stopped
    never finished: KILLED, tagged with why. A trial cut short by an interruption (its actor
    killed mid-epoch, so its run may still say RUNNING): KILLED; resuming it sets it running.
    (These trials' processes are gone, so their own run lifecycle could not end them.)"""
    if not cfg.tracking.enabled:
        return
    c = tracking.client(cfg.tracking)
    by_trial = {r.trial_id: r for r in results if r.trial_id}
    for trial_id, info in runs.trial_runs(sweep_dir).items():
        run_id = info.get("mlflow_run_id")
        if not run_id or info.get("finished"):
            continue
        result = by_trial.get(trial_id)
        status = result.status if result else "pending"
        if status == "stopped":
            tracking.end_run(c, run_id, tracking.KILLED,
                             tags={tracking.STOPPED_EARLY_TAG: f"by the {cfg.tune.scheduler} scheduler"})
        elif status == "interrupted" or c.get_run(run_id).info.status == tracking.RUNNING:
            tracking.end_run(c, run_id, tracking.KILLED)


def _publish_table(client, parent_run_id: str | None, sweep_dir: storage.Location, rows: list[dict]) -> None:
    markdown, csv_text = sweeps.to_markdown(rows), sweeps.to_csv(rows)
    write_text(sweep_dir / "ablation.md", markdown + "\n")
    write_text(sweep_dir / "ablation.csv", csv_text)
    fig = sweeps.ablation_figure(rows)
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    write_bytes(sweep_dir / "ablation.png", png.getvalue())
    if client is not None:
        client.log_text(parent_run_id, markdown + "\n", "ablation/ablation.md")
        client.log_text(parent_run_id, csv_text, "ablation/ablation.csv")
        client.log_figure(parent_run_id, fig, "ablation/ablation.png")
        client.set_tag(parent_run_id, "rsrefseg.failed_rows", str(sum(r["status"] == "failed" for r in rows)))
    import matplotlib.pyplot as plt

    plt.close(fig)
    print("\nAblation table (val split, percent; best epoch per trial):")
    print(markdown)
    say(f"table: {sweep_dir / 'ablation.md'} (also in the sweep's MLflow parent run)")

