"""The train job's driver around `trainer.fit()`: an MLflow run is never left RUNNING by a failure
before training starts, and Ray Train's controller polls at train.poll_interval_s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rsrefseg.jobs import session
from rsrefseg.jobs import train as train_job
from rsrefseg.platform.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _cfg(prepared: Path, home: Path):
    return load_config(REPO / "configs/demo.yaml", [
        f"data.path={prepared}", f"train.storage_path={home / 'runs'}",
        f"tracking.uri=sqlite:///{home / 'mlflow.db'}", "tracking.experiment=driver",
    ])


def _statuses(home: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("driver")
    return [r.info.status for r in client.search_runs([exp.experiment_id])] if exp else []


@pytest.mark.parametrize("error, status", [(RuntimeError("shard 3 is unreadable"), "FAILED"),
                                           (KeyboardInterrupt(), "KILLED")])
def test_a_run_whose_splits_fail_to_cache_is_not_left_running(prepared_dataset, tmp_path, monkeypatch, error, status):
    # Building the trainer materializes the cached splits (seconds of Ray Data work), after the
    # MLflow run exists: an error or a Ctrl-C there ends the run as one in training would.
    def failing_trainer(*args, **kwargs):
        raise error

    monkeypatch.setattr(session, "start_ray", lambda cfg, ingest: 4)
    monkeypatch.setattr(train_job, "build_trainer", failing_trainer)
    with pytest.raises(type(error)):
        train_job.run_train(_cfg(prepared_dataset, tmp_path))
    assert _statuses(tmp_path) == [status]


def test_the_poll_interval_reaches_ray_train_s_controller_for_the_fit_only(monkeypatch):
    # Ray passes these variables of the driver's environment on to the controller actor, which
    # reads its interval from there.
    from ray.train.v2._internal import constants

    assert train_job.POLL_INTERVAL_ENV == constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert train_job.POLL_INTERVAL_ENV in constants.ENV_VARS_TO_PROPAGATE
    monkeypatch.setenv(train_job.POLL_INTERVAL_ENV, "7")
    with train_job.controller_poll_interval(0.5):
        assert constants.get_env_vars_to_propagate()[train_job.POLL_INTERVAL_ENV] == "0.5"
    assert os.environ[train_job.POLL_INTERVAL_ENV] == "7"
    monkeypatch.delenv(train_job.POLL_INTERVAL_ENV)
    with train_job.controller_poll_interval(0.25):
        assert os.environ[train_job.POLL_INTERVAL_ENV] == "0.25"
    assert train_job.POLL_INTERVAL_ENV not in os.environ


def test_run_train_fits_with_the_configured_poll_interval(prepared_dataset, tmp_path, monkeypatch):
    seen = {}

    class Trainer:
        def fit(self):
            seen["interval"] = os.environ.get(train_job.POLL_INTERVAL_ENV)
            raise RuntimeError("stop here")

    monkeypatch.setattr(session, "start_ray", lambda cfg, ingest: 4)
    monkeypatch.setattr(train_job, "build_trainer", lambda *a, **k: Trainer())
    cfg = load_config(REPO / "configs/demo.yaml", [
        f"data.path={prepared_dataset}", f"train.storage_path={tmp_path / 'runs'}", "tracking.enabled=false",
        "train.poll_interval_s=0.75",
    ])
    with pytest.raises(train_job.TrainingFailed, match="stop here"):
        train_job.run_train(cfg)
    assert seen == {"interval": "0.75"}
