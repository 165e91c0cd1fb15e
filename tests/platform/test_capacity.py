"""A job whose train workers would leave Ray Data no CPU fails at once (or Tune runs fewer trials)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsrefseg.platform.capacity import NotEnoughCPUs, check_ingest_capacity, concurrent_trials
from rsrefseg.platform.config import Config

REPO = Path(__file__).resolve().parents[2]


def cfg(*overrides: str) -> Config:
    return Config().replace(["train.num_workers=2", "train.cpus_per_worker=1", *overrides])


def test_workers_holding_every_cpu_fail_with_the_numbers_and_the_keys():
    with pytest.raises(NotEnoughCPUs) as err:
        check_ingest_capacity(cfg(), 2, where="the test cluster")
    text = str(err.value)
    assert "= 2 CPUs for the train workers leaves 0 of the 2 CPUs of the test cluster" in text
    for key in ("train.cpus_per_worker", "train.num_workers", "cluster.num_cpus", "train.ingest_cpus=1"):
        assert key in text


def test_one_cpu_left_for_ingest_is_enough_and_more_can_be_asked():
    check_ingest_capacity(cfg(), 3, where="x")  # no error
    check_ingest_capacity(cfg("train.cpus_per_worker=0.5"), 2, where="x")  # fractions leave room
    with pytest.raises(NotEnoughCPUs, match="train.ingest_cpus=2"):
        check_ingest_capacity(cfg("train.ingest_cpus=2"), 3, where="x")
    check_ingest_capacity(cfg("cluster.check_capacity=false"), 2, where="x")  # the user's call


def test_tune_runs_as_many_trials_as_leave_ingest_its_cpus(capsys):
    # 4 CPUs, trials of 2 workers x 1 CPU + a token driver: only one fits beside ingest.
    assert concurrent_trials(cfg("tune.max_concurrent_trials=4"), 4, driver_cpu=0.01, where="x") == 1
    assert "tune.max_concurrent_trials=4 would starve it" in capsys.readouterr().out
    assert concurrent_trials(cfg("tune.max_concurrent_trials=0"), 9, driver_cpu=0.01, where="x") == 3
    assert concurrent_trials(cfg("tune.max_concurrent_trials=2"), 9, driver_cpu=0.01, where="x") == 2
    assert capsys.readouterr().out.count("running") == 1  # only the auto case speaks
    with pytest.raises(NotEnoughCPUs):
        concurrent_trials(cfg(), 2, driver_cpu=0.01, where="x")


def test_train_on_a_local_ray_the_workers_fill_fails_in_seconds(prepared_dataset, tmp_path):
    # The case: two workers of one CPU on a two-CPU Ray. A fresh process, so no Ray of
    # the test session is joined: the job must refuse before starting one, never hang.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rsrefseg", "train", "--config", str(REPO / "configs/demo.yaml"),
         f"data.path={prepared_dataset}", "cluster.num_cpus=2", "train.num_workers=2", "train.cpus_per_worker=1",
         f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert "leaves 0 of the 2 CPUs of the local Ray" in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was created


@pytest.mark.slow
def test_train_joining_a_cluster_the_workers_fill_fails_before_training(ray_session, prepared_dataset, project_home):
    from rsrefseg.jobs.train import run_train

    cpus = int(ray_session.cluster_resources()["CPU"])
    bad = Config().replace([f"data.path={prepared_dataset}", f"train.num_workers={cpus}", "train.cpus_per_worker=1",
                            f"train.batch_size={cpus}", "tracking.enabled=false"])
    with pytest.raises(NotEnoughCPUs, match=f"leaves 0 of the {cpus} CPUs of the Ray cluster"):
        run_train(bad)
    assert not (project_home / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # the bound on "never hangs"; worker start-up on 2 busy cores is most of it
def test_a_starved_training_job_fails_with_the_watchdog_message_not_a_hang(ray_session, prepared_dataset, project_home):
    # The check switched off (as for an autoscaling cluster): the workers take every CPU, Ray
    # Data gets none, and the worker's watchdog ends the run instead of waiting forever. One
    # worker holding every CPU: the same starvation, with one worker process to start.
    from rsrefseg.jobs.train import TrainingFailed, run_train

    cpus = int(ray_session.cluster_resources()["CPU"])
    starved = Config().replace([
        f"data.path={prepared_dataset}", "train.num_workers=1", f"train.cpus_per_worker={cpus}",
        "train.batch_size=2", "train.epochs=1", "tracking.enabled=false", "cluster.check_capacity=false",
        "train.batch_timeout_s=3", "train.figure_samples=0",
        "data.cache_mib=0",  # streamed, as a real dataset is: a cached split needs no CPU to read
    ])
    with pytest.raises(TrainingFailed) as err:
        run_train(starved)
    assert "no batch for 3 s" in str(err.value) and "CPU 0.0/" in str(err.value)
