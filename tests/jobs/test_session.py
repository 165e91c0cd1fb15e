"""The one run session: whatever step of a job fails or is interrupted, its MLflow run ends
FINISHED, FAILED or KILLED, never RUNNING; register included."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from rsrefseg.jobs import register, session
from rsrefseg.jobs import train as train_job
from rsrefseg.platform import runs, tracking
from rsrefseg.platform.config import load_config
from rsrefseg.platform.errors import TrainingInterrupted

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store for the module (creating a SQLite store takes seconds); each test has
    an experiment of its own, named after its folder."""
    return tmp_path_factory.mktemp("session-store") / "mlflow.db"


@pytest.fixture(autouse=True)
def _store(store, monkeypatch):
    monkeypatch.setattr(f"{__name__}.STORE", store)


STORE: Path = Path()


def _cfg(home: Path, *overrides: str):
    return session.resolve(load_config(REPO / "configs/demo.yaml", [
        f"train.storage_path={home / 'runs'}", f"tracking.uri=sqlite:///{STORE}",
        f"tracking.experiment=session-{home.name}", *overrides]))


def _runs(home: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{STORE}")
    exp = client.get_experiment_by_name(f"session-{home.name}")
    return client.search_runs([exp.experiment_id]) if exp else []


def _statuses(home: Path) -> list[str]:
    return [r.info.status for r in _runs(home)]


def _sigterm(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this ends
    raise AssertionError("SIGTERM did not interrupt the block")


def test_a_completed_block_ends_finished_with_everything_recorded(tmp_path):
    cfg = _cfg(tmp_path)
    manifest = {"format": "synthetic", "content_hash": "ab" * 32, "counts": {"val": 3}}
    inputs = session.Inputs(manifest, "/data/x", {"validation": "val"})
    with session.open_run(cfg, job="evaluate", run_name="e", tags={"k": "v"}, inputs=inputs) as run:
        assert run.client.get_run(run.run_id).info.status == "RUNNING"
    (recorded,) = _runs(tmp_path)
    assert recorded.info.status == "FINISHED"
    assert recorded.data.tags["rsrefseg.job"] == "evaluate" and recorded.data.tags["k"] == "v"
    assert recorded.data.params["train.epochs"] == str(cfg.train.epochs)
    assert len(recorded.inputs.dataset_inputs) == 1


@pytest.mark.parametrize("step", ["record_run", "log_dataset", "body"])
@pytest.mark.parametrize("error, status", [(OSError("disk full"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                                           (TrainingInterrupted("stopped"), "KILLED"), (SystemExit(0), "KILLED")])
def test_a_failure_or_interruption_at_any_step_ends_the_run(tmp_path, monkeypatch, step, error, status):
    def fail(*_args, **_kwargs):
        raise error

    if step != "body":
        monkeypatch.setattr(tracking, step, fail)
    inputs = session.Inputs({"content_hash": ""}, "/data/x", {"evaluation": "test"})
    with pytest.raises(type(error)):
        with session.open_run(_cfg(tmp_path), job="evaluate", run_name="e", inputs=inputs):
            fail()
    assert _statuses(tmp_path) == [status]


def test_sigterm_inside_the_block_ends_the_run_killed(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with session.open_run(_cfg(tmp_path), job="train", run_name="t"):
            _sigterm()
    assert _statuses(tmp_path) == ["KILLED"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the block's only


def test_a_continued_run_is_set_running_again_and_not_recorded_twice(tmp_path):
    cfg = _cfg(tmp_path)
    with session.open_run(cfg, job="train", run_name="t") as first:
        pass
    with session.open_run(cfg, job="train", run_name="t", run_id=first.run_id) as again:
        assert again.run_id == first.run_id
        assert again.client.get_run(first.run_id).info.status == "RUNNING"
    (recorded,) = _runs(tmp_path)
    assert recorded.info.status == "FINISHED"


def test_without_tracking_there_is_no_run(tmp_path):
    with session.open_run(_cfg(tmp_path, "tracking.enabled=false"), job="train", run_name="t") as run:
        assert run == session.Run(None, None)
    assert _runs(tmp_path) == []


def test_a_failed_run_folder_write_does_not_leave_the_train_run_running(prepared_dataset, tmp_path, monkeypatch):
    # The run folder's record (an S3 write on object storage) is written inside the lifecycle.
    def unwritable(*_args, **_kwargs):
        raise OSError("AWS Error ACCESS_DENIED")

    monkeypatch.setattr(session, "start_ray", lambda cfg, ingest: 4)
    monkeypatch.setattr(runs, "create_run", unwritable)
    with pytest.raises(OSError):
        train_job.run_train(_cfg(tmp_path, f"data.path={prepared_dataset}"))
    assert _statuses(tmp_path) == ["FAILED"]


@pytest.mark.parametrize("error, status", [(RuntimeError("store refused the model"), "FAILED"),
                                           (KeyboardInterrupt(), "KILLED")])
def test_register_ends_its_run_by_how_log_model_ended(tiny_checkpoint, tmp_path, monkeypatch, error, status):
    import sys

    import mlflow
    import mlflow.pyfunc

    def log_model(**_kwargs):
        assert mlflow.active_run() is not None  # the fluent run is the session's
        raise error

    monkeypatch.setattr(sys.modules["mlflow.pyfunc"], "log_model", log_model)
    with pytest.raises(type(error)):
        register.register_checkpoint(_cfg(tmp_path), tiny_checkpoint, "m")
    assert _statuses(tmp_path) == [status]
    assert mlflow.active_run() is None  # nothing left on the fluent API's stack


def test_register_finishes_its_run(tiny_checkpoint, tmp_path):
    assert register.register_checkpoint(_cfg(tmp_path), tiny_checkpoint, f"m-{tmp_path.name}") == 1
    (recorded,) = _runs(tmp_path)
    assert recorded.info.status == "FINISHED" and recorded.data.tags["rsrefseg.job"] == "register"


def test_a_trial_that_failed_before_its_run_shows_as_failed_with_its_params(tmp_path):
    from rsrefseg.jobs import tune

    cfg = _cfg(tmp_path)
    with session.open_run(cfg, job="tune", run_name="sweep") as parent:
        tune._record_failed_trial(cfg, "sweep/trials/t1", parent.run_id, RuntimeError("no such preset"),
                                  run_name="lr=0.1", trial_id="t1")
    child = next(r for r in _runs(tmp_path) if r.data.tags.get("rsrefseg.trial_id") == "t1")
    assert child.info.status == "FAILED" and child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.data.tags["rsrefseg.error"] == "no such preset" and child.data.tags["rsrefseg.job"] == "train"
    assert child.data.params["model.lora.sam_rank"] == str(cfg.model.lora.sam_rank)  # lines up in compare
