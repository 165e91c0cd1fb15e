"""From Tune's results to the ablation table: finished, stopped early, failed, interrupted,
pending; and the trials' MLflow runs after the sweep loop. No Ray."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import pandas as pd

from rsrefseg.platform.metric_names import METRIC_NAMES
from rsrefseg.training import sweep as sweeps
from rsrefseg.jobs import tune
from rsrefseg.platform import runs, signals, tracking
from tests.models.helpers import tiny_config


@dataclass
class FakeResult:
    """What `collect_results` reads of a `ray.tune.Result`."""

    setting: dict | None
    epochs: list[float] = field(default_factory=list)  # val/gIoU per epoch reported
    error: Exception | None = None
    trial_id: str = ""
    done: bool = True  # Tune's flag on the last result: False = the sweep stopped while it ran

    @property
    def config(self):  # Tune's Result.config comes from the last result: None before any report
        return {"train_loop_config": {"overrides": self.setting}} if self.setting is not None else None

    @property
    def metrics(self):
        return {"trial_id": self.trial_id, "done": self.done}

    @property
    def metrics_dataframe(self):
        if not self.epochs:
            return None
        rows = [{"epoch": i + 1, **{f"val/{c}": g for c in METRIC_NAMES}} for i, g in enumerate(self.epochs)]
        return pd.DataFrame(rows)


def test_results_say_finished_stopped_failed_or_pending():
    base = tiny_config(["train.epochs=3"])
    grid = [
        FakeResult({"model.lora.sam_rank": 4}, epochs=[1.0, 5.0, 3.0], trial_id="a"),
        FakeResult({"model.lora.sam_rank": 8}, epochs=[2.0], trial_id="b"),  # ASHA cut it at epoch 1
        FakeResult({"model.lora.sam_rank": 16}, error=RuntimeError("boom"), trial_id="c"),
        FakeResult({"model.lora.sam_rank": 32}, trial_id="d"),
        FakeResult({"model.lora.sam_rank": 16, "train.epochs": 1}, epochs=[7.0], trial_id="e"),  # swept epochs
        FakeResult({"model.lora.sam_rank": 2}, epochs=[2.0], trial_id="f", done=False),  # Ctrl-C during epoch 2
        FakeResult(None),  # Ctrl-C before its first report: Tune knows not even its setting
    ]
    results = tune.collect_results(grid, base)
    assert [r.status for r in results] == ["finished", "stopped", "failed", "pending", "finished", "interrupted",
                                           "pending"]
    assert results[0].best_epoch == 2 and results[0].metrics["gIoU"] == 5.0
    assert [r.trial_id for r in results] == ["a", "b", "c", "d", "e", "f", ""]
    # A stopped trial keeps its figures in the table, marked as stopped.
    row = sweeps._row("SAM LoRA rank", "8", results[1])
    assert row["gIoU"] == 2.0 and row["best epoch"] == 1 and row["status"] == "stopped"


def test_no_trial_run_is_left_running_after_the_sweep_loop(tmp_path):
    cfg = tiny_config([f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=t",
                       "tune.scheduler=asha"])
    c = tracking.client(cfg.tracking)
    # trial: (its result's status, its run folder's "finished" record, its MLflow status before)
    trials = {
        "a": ("finished", {"best_metrics": {}, "history": []}, "RUNNING"),  # its own lifecycle's business: untouched
        "b": ("stopped", None, "RUNNING"),
        "c": ("interrupted", None, "FAILED"),  # its actor stopped mid-fit
        "d": (None, None, "RUNNING"),  # interrupted before its first epoch: no result to name it
        "e": ("failed", None, "FAILED"),
    }
    ids = {}
    for trial, (_, finished, before) in trials.items():
        ids[trial] = tracking.create_run(cfg, run_name=trial)
        if before != "RUNNING":
            c.set_terminated(ids[trial], status=before)
        run_dir = tmp_path / runs.trial_name("sweep", trial)
        runs.create_run(run_dir, cfg, ids[trial])
        if finished:
            runs.finish_run(run_dir, cfg, ids[trial], **finished)
    results = [sweeps.TrialResult(setting={}, status=status, trial_id=trial)
               for trial, (status, _, _) in trials.items() if status]
    tune._settle_trial_runs(cfg, tmp_path / "sweep", results)
    after = {trial: c.get_run(run_id) for trial, run_id in ids.items()}
    assert {t: r.info.status for t, r in after.items()} == {
        "a": "RUNNING", "b": "KILLED", "c": "KILLED", "d": "KILLED", "e": "FAILED"}
    assert "asha" in after["b"].data.tags[tracking.STOPPED_EARLY_TAG]
    assert not any(tracking.STOPPED_EARLY_TAG in after[t].data.tags for t in "acde")


def test_a_stop_signal_during_the_sweep_stops_it_as_ctrl_c_does():
    # `rsrefseg jobs stop` sends SIGTERM; Tune's graceful stop (save state, stop trials) is its SIGINT handler.
    seen, before = [], signal.getsignal(signal.SIGTERM)
    with signals.sigterm_as_sigint(), tune._without_tuner_restore_hint():
        tune_handler = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                if seen:
                    break
                time.sleep(0.01)
        finally:
            signal.signal(signal.SIGINT, tune_handler)
    assert seen == [signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == before  # the command's own handler is back
