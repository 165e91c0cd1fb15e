"""A Ray Tune sweep end to end on the synthetic set at `tiny`: a one-at-a-time ablation under ASHA,
with a failing trial, interrupted and resumed, filling its table. Every trial is a real DeepSpeed
run, of one worker: two ZeRO-2 ranks are the train e2e's subject, and a worker process fewer to
start in each trial takes ~16 s off this test (95 s -> 78 s measured). The sweep lives in object
storage (an S3 bucket of the tests' moto server, tests/s3.py), as on a multi-node cluster: Tune's
state, every trial's checkpoints and the table are objects there, and the resume reads them back
from the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rsrefseg.cli import main


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def tune_args(prepared: Path, home: Path, sweep: Path, storage: str, *extra: str) -> list[str]:
    return [
        "tune", "--config", str(REPO / "configs/demo.yaml"), "--sweep", str(sweep),
        f"data.path={prepared}", "train.epochs=1", "train.batch_size=4", "data.limit=16",
        "train.figure_samples=0", "tune.cpus_per_worker=1",
        "tune.max_concurrent_trials=1",
        f"tracking.uri=sqlite:///{home / 'mlflow.db'}", "tracking.experiment=tune",
        f"train.storage_path={storage}", *extra,
    ]


def _init_store(home: Path) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").search_experiments()


def _experiment_exists(home: Path) -> bool:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").get_experiment_by_name("tune") is not None


def context(dataset_input) -> str:
    return {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"]


def runs_of(home: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("rsrefseg.job") == "tune"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_an_interrupted_ablation_resumes_its_unfinished_trials_and_fills_its_table(ray_session, prepared_dataset, tmp_path,
                                                                                   s3_server, s3_bucket, monkeypatch,
                                                                                   capsys):
    from rsrefseg.platform.storage import location

    # A one-at-a-time sweep as the paper's ablation is (configs/sweeps/ablation.yaml: the same
    # machinery over 8 trials; its expansion and table are tested without Ray in test_sweep.py):
    # the shared default (demo.yaml's SAM rank 8), rank 16, and a dataset that is not there; under
    # ASHA, the scheduler of this suite. It is interrupted (Ctrl-C) once its first trial has
    # finished, then resumed as the README shows.
    # ASHA stops a trial the moment it reports its last epoch (max_t; grace_period = max_t here,
    # so no trial is stopped earlier, which keeps the test deterministic): that must not cut off
    # the trial's ending (FINISHED, best checkpoint), before and after the resume. ASHA stopping a
    # trial early: test_tune_results.py.
    missing = tmp_path / "missing"
    sweep = tmp_path / "small-ablation.yaml"
    sweep.write_text(yaml.safe_dump({"mode": "one_at_a_time", "axes": [
        {"name": "SAM LoRA rank", "key": "model.lora.sam_rank", "values": [8, 16]},
        {"name": "dataset", "key": "data.path", "values": [str(prepared_dataset), str(missing)],
         "labels": ["synthetic", "missing"]}]}))
    runs_uri = f"s3://{s3_bucket}/runs"
    args = tune_args(prepared_dataset, tmp_path, sweep, runs_uri, "tune.name=ablation", "train.epochs=2",
                     "tune.scheduler=asha", "tune.grace_period=2")
    # The AWS variables of the tests' store (credentials, endpoint) are in this environment.
    env = {**os.environ, "RSREFSEG_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    # Create the MLflow store before polling it: two processes creating one SQLite schema at
    # the same moment collide ("duplicate column name").
    _init_store(tmp_path)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rsrefseg", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            time.sleep(2)
            if _experiment_exists(tmp_path):
                _, _, children = runs_of(tmp_path)
                if any(c.info.status == "FINISHED" for c in children):
                    break
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = (tmp_path / "first.log").read_text()
    # Interrupted, as Ctrl-C of `rsrefseg train` is: exit 130, and the command that continues it.
    assert proc.returncode == 130, first[-3000:]
    assert f"rsrefseg tune --resume {runs_uri}/ablation" in first
    assert "Tuner.restore(" not in first
    _, (parent,), before = runs_of(tmp_path)
    assert parent.info.status == "KILLED"
    finished_before = {c.info.run_id: c.info.end_time for c in before if c.info.status == "FINISHED"}
    assert len(finished_before) == 1
    # The trial cut short is KILLED (not left RUNNING) and not mistaken for one ASHA stopped.
    assert {c.info.status for c in before} <= {"FINISHED", "KILLED"}, [(c.info.run_name, c.info.status) for c in before]
    assert not any("rsrefseg.stopped_early" in c.data.tags for c in before)

    # Resumed as the command printed it, in this process (its Ray is up already: seconds saved).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSREFSEG_HOME", str(tmp_path))
    capsys.readouterr()
    assert main(["tune", "--resume", f"{runs_uri}/ablation"]) == 0
    printed = capsys.readouterr().out
    client, (parent,), children = runs_of(tmp_path)
    assert parent.info.status == "FINISHED"
    assert len(children) == 3, [c.info.run_name for c in children]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    by_setting = {(c.data.params["model.lora.sam_rank"], c.data.params["data.path"]): c for c in children}
    # Params name paths under the project folder relative to it (tmp_path here), as checkpoints do.
    assert set(by_setting) == {("8", str(prepared_dataset)), ("16", str(prepared_dataset)), ("8", "missing")}
    # The failing trial (no such dataset) is reported FAILED; the sweep went on with the others.
    assert by_setting["8", "missing"].info.status == "FAILED"
    assert by_setting["8", "missing"].data.tags["rsrefseg.error"]
    finished = [by_setting["8", str(prepared_dataset)], by_setting["16", str(prepared_dataset)]]
    assert all(c.info.status == "FINISHED" for c in finished)
    assert not any("rsrefseg.stopped_early" in c.data.tags for c in children)
    for run_id, end_time in finished_before.items():
        # Trials that had finished were not run again.
        assert client.get_run(run_id).info.end_time == end_time
    for c in finished:
        # Every epoch logged once, the interrupted trial's too (it went on in the same MLflow run).
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val/gIoU")]
        assert sorted(steps) == [1, 2], (c.info.run_name, steps)
        assert (location(runs_uri) / "ablation/trials" / c.data.tags["rsrefseg.trial_id"] / "best/config.yaml").is_file()
    # Resumed trials continued in their own folders (from their checkpoints), not in new ones.
    # (pyarrow marks a folder it creates with an empty `runs/` object.)
    assert {key.split("/")[1] for key in s3_server.keys(s3_bucket, "runs/")} - {""} == {"ablation"}
    assert not (tmp_path / "runs").exists()  # nothing of the sweep on this machine's disk
    # Every child run has the same flat param names as a train run.
    assert set(finished[0].data.params) == set(finished[1].data.params)
    # Child runs are named by what they vary; the trial id is a tag.
    assert {c.info.run_name for c in finished} == {"default", "sam_rank=16"}
    assert all(c.data.tags["rsrefseg.trial_id"] for c in children)
    # The experiment opens in MLflow's model-training view; each run shows the data it trained on.
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(finished[0].info.run_id)
    inputs = {context(i): i.dataset for i in run.inputs.dataset_inputs}
    manifest = json.loads((prepared_dataset / "manifest.json").read_text())
    assert inputs["train"].digest == manifest["content_hash"][:32] and set(inputs) == {"train", "validation"}

    table = (location(runs_uri) / "ablation/ablation.csv").read_text().splitlines()
    header, rows = table[0].split(","), [line.split(",") for line in table[1:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("SAM LoRA rank", "8", "finished"), ("SAM LoRA rank", "16", "finished"),
        ("dataset", "synthetic", "finished"), ("dataset", "missing", "failed")]
    # Every cell filled from the trials' own runs: the table's gIoU values are the runs' best;
    # the shared default fills one row on each axis.
    g = header.index("gIoU")
    assert {round(float(r[g]), 6) for r in rows[:3]} == {round(c.data.metrics["best/gIoU"], 6) for c in finished}
    assert rows[0][g] == rows[2][g] and rows[3][g] == ""
    assert "| SAM LoRA rank | 8 |" in printed and "| dataset | missing |" in printed
    assert client.get_run(parent.info.run_id).data.tags["rsrefseg.failed_rows"] == "1"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")}
    assert artifacts == {"ablation/ablation.md", "ablation/ablation.csv", "ablation/ablation.png"}
