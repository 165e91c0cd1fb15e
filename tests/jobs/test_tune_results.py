"""From Tune's results to the ablation table: finished, stopped early, failed, pending. No Ray."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from rsrefseg.jobs import sweep as sweeps
from rsrefseg.jobs import tune
from rsrefseg.jobs.train import RUN_INFO
from rsrefseg.platform import tracking
from tests.models.helpers import tiny_config


@dataclass
class FakeResult:
    """What `collect_results` reads of a `ray.tune.Result`."""

    setting: dict
    epochs: list[float] = field(default_factory=list)  # val/gIoU per epoch reported
    error: Exception | None = None
    trial_id: str = ""

    @property
    def config(self):
        return {"train_loop_config": {"overrides": self.setting}}

    @property
    def metrics(self):
        return {"trial_id": self.trial_id}

    @property
    def metrics_dataframe(self):
        if not self.epochs:
            return None
        rows = [{"epoch": i + 1, **{f"val/{c}": g for c in sweeps.METRIC_COLUMNS}} for i, g in enumerate(self.epochs)]
        return pd.DataFrame(rows)


def test_results_say_finished_stopped_failed_or_pending():
    base = tiny_config(["train.epochs=3"])
    grid = [
        FakeResult({"model.lora.sam_rank": 4}, epochs=[1.0, 5.0, 3.0], trial_id="a"),
        FakeResult({"model.lora.sam_rank": 8}, epochs=[2.0], trial_id="b"),  # ASHA cut it at epoch 1
        FakeResult({"model.lora.sam_rank": 16}, error=RuntimeError("boom"), trial_id="c"),
        FakeResult({"model.lora.sam_rank": 32}, trial_id="d"),
        FakeResult({"model.lora.sam_rank": 16, "train.epochs": 1}, epochs=[7.0], trial_id="e"),  # swept epochs
    ]
    results = tune.collect_results(grid, base)
    assert [r.status for r in results] == ["finished", "stopped", "failed", "pending", "finished"]
    assert results[0].best_epoch == 2 and results[0].metrics["gIoU"] == 5.0
    assert [r.trial_id for r in results] == ["a", "b", "c", "d", "e"]
    # A stopped trial keeps its figures in the table, marked as stopped.
    row = sweeps._row("SAM LoRA rank", "8", results[1])
    assert row["gIoU"] == 2.0 and row["best epoch"] == 1 and row["status"] == "stopped"


def test_stopped_trials_mlflow_runs_end_as_killed(tmp_path):
    cfg = tiny_config([f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=t",
                       "tune.scheduler=asha"])
    ids = {}
    for trial in ("a", "b"):
        ids[trial] = tracking.start_run(cfg, run_name=trial)
        (tmp_path / "trials" / trial).mkdir(parents=True)
        (tmp_path / "trials" / trial / RUN_INFO).write_text(json.dumps({"mlflow_run_id": ids[trial]}))
    results = [sweeps.TrialResult(setting={}, status="finished", trial_id="a"),
               sweeps.TrialResult(setting={}, status="stopped", trial_id="b")]
    tune._close_stopped_runs(cfg, tmp_path, results)
    c = tracking.client(cfg.tracking)
    assert c.get_run(ids["a"]).info.status == "RUNNING"  # finish_run's business, not this
    stopped = c.get_run(ids["b"])
    assert stopped.info.status == "KILLED" and "asha" in stopped.data.tags["rsrefseg.stopped_early"]
