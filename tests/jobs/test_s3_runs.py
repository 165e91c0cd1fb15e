"""Runs that live in object storage, against a real S3 API on loopback (moto's server, IAM
authentication on; tests/s3.py): bad storage fails before Ray, and a run on `s3://` trains,
checkpoints into the bucket, survives an outage of the store and is continued from it, and its
checkpoint is read back from the bucket by evaluate, predict and register.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsrefseg.cli import main
from rsrefseg.platform import storage
from tests.network import free_port

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo.yaml")


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the job reaches the point where it takes Ray resources."""
    import rsrefseg.jobs.session as session

    def refuse(cfg, **kwargs):
        raise AssertionError("the job went on to start Ray")

    monkeypatch.setattr(session, "start_ray", refuse)


def bad_storage_cases(s3, bucket: str) -> list[tuple[str, dict, str, list[str]]]:
    """(id, environment changes, train.storage_path, what the error must name)."""
    good = f"s3://{bucket}/runs"
    return [
        ("missing bucket", {}, "s3://no-such-bucket-rsr/runs", ["s3://no-such-bucket-rsr/runs", "NO_SUCH_BUCKET", "aws s3 mb"]),
        ("no credentials", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, good,
         ["no AWS credentials", "AWS_ACCESS_KEY_ID"]),
        ("unknown key", {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000", "AWS_SECRET_ACCESS_KEY": "wrong"}, good,
         ["INVALID_ACCESS_KEY_ID", "unknown to this store"]),
        ("read-only key", dict(zip(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), s3.reader)), good,
         ["ACCESS_DENIED", "no write permission"]),
        ("wrong endpoint", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, good,
         ["NETWORK_CONNECTION", "AWS_ENDPOINT_URL"]),
        ("credentials in the URI", {}, f"s3://{bucket}/runs?access_key=AKIA&secret_key=x",
         ["not in the URI", "AWS_ACCESS_KEY_ID"]),
    ]


@pytest.mark.parametrize("case", range(6), ids=["missing bucket", "no credentials", "unknown key", "read-only key",
                                                 "wrong endpoint", "credentials in the URI"])
def test_bad_storage_fails_before_ray_naming_key_uri_and_answer(case, s3_server, s3_bucket, prepared_dataset,
                                                                project_home, monkeypatch, no_ray, capsys):
    name, env, uri, expected = bad_storage_cases(s3_server, s3_bucket)[case]
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    started = time.monotonic()
    rc = main(["train", "--config", DEMO, f"data.path={prepared_dataset}", f"train.storage_path={uri}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "train.storage_path" in err and uri.split("?")[0] in err, err
    for text in expected:
        assert text in err, (name, err)
    assert time.monotonic() - started < 30  # a dead endpoint is not retried for minutes
    assert s3_server.keys(s3_bucket) == []  # nothing was left behind


def test_resume_and_checkpoint_uris_say_what_is_missing(s3_server, s3_bucket, project_home, no_ray, capsys):
    assert main(["train", "--resume", f"s3://{s3_bucket}/runs/nothing-here"]) == 2
    err = capsys.readouterr().err
    assert f"s3://{s3_bucket}/runs/nothing-here" in err and "rsrefseg_run.json" in err
    assert main(["evaluate", "--checkpoint", f"s3://{s3_bucket}/runs/nothing-here", "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert f"s3://{s3_bucket}/runs/nothing-here" in err and "not a checkpoint" in err
    assert main(["evaluate", "--checkpoint", "s3://no-such-bucket-rsr/runs/x", "--split", "test"]) == 2
    assert "NO_SUCH_BUCKET" in capsys.readouterr().err


def test_remote_path_walks_a_prefix_like_a_folder(s3_server, s3_bucket):
    root = storage.location(f"s3://{s3_bucket}/runs")
    assert isinstance(root, storage.RemotePath) and str(root) == f"s3://{s3_bucket}/runs"
    for name in ("a/rsrefseg_run.json", "b/rsrefseg_run.json", "b/checkpoint_000000/state.json", "c/other.txt"):
        (root / name).write_text(json.dumps({"name": name}))
    assert [p.name for p in root.iterdir()] == ["a", "b", "c"]
    assert [str(p.relative_to(root)) for p in root.glob("*/rsrefseg_run.json")] == ["a/rsrefseg_run.json",
                                                                                 "b/rsrefseg_run.json"]
    assert [p.parent.name for p in root.glob("*/checkpoint_*/state.json")] == ["checkpoint_000000"]
    assert (root / "a").is_dir() and not (root / "a").is_file() and (root / "a/rsrefseg_run.json").is_file()
    assert not (root / "zzz").exists()
    assert json.loads((root / "b/rsrefseg_run.json").read_text()) == {"name": "b/rsrefseg_run.json"}
    with pytest.raises(FileNotFoundError):
        (root / "zzz").read_text()


# -- a run in the bucket, end to end --------------------------------------------------------------


def _args(prepared: Path, home: Path, bucket: str, *extra: str) -> list[str]:
    return ["train", "--config", DEMO, f"data.path={prepared}", "train.epochs=3", "train.batch_size=4",
            "data.limit=24", "train.figure_samples=1", f"train.storage_path=s3://{bucket}/runs",
            f"tracking.uri=sqlite:///{home / 'mlflow.db'}", "tracking.experiment=s3", "tracking.system_metrics_s=0",
            *extra]


@pytest.mark.slow
def test_run_in_s3_survives_a_store_outage_and_resumes_from_the_bucket(ray_session, s3_server, s3_bucket,
                                                                       prepared_dataset, project_home, capsys,
                                                                       monkeypatch):
    from mlflow.tracking import MlflowClient

    home = project_home
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(_args(prepared_dataset, home, s3_bucket))))
    thread.start()
    deadline = time.time() + 300
    while thread.is_alive() and not s3_server.checkpointed_epochs(s3_bucket) and time.time() < deadline:
        time.sleep(0.2)
    assert s3_server.checkpointed_epochs(s3_bucket) == [1], "no first checkpoint in the bucket"
    # The store goes away mid-run: the next checkpoint cannot be written.
    s3_server.stop()
    try:
        thread.join(timeout=300)
    finally:
        s3_server.restart()
    out, err = capsys.readouterr()
    assert result["rc"] == 1, out[-3000:] + err[-3000:]
    (run_name,) = {k.split("/")[1] for k in s3_server.keys(s3_bucket, "runs/") if k.endswith("rsrefseg_run.json")}
    run_uri = f"s3://{s3_bucket}/runs/{run_name}"
    assert f"rsrefseg train --resume {run_uri}" in err  # what to type, with the bucket's URI
    assert s3_server.checkpointed_epochs(s3_bucket) == [1]  # the complete checkpoint is still there

    assert main(["train", "--resume", run_uri]) == 0
    capsys.readouterr()
    keys = s3_server.keys(s3_bucket, f"runs/{run_name}/")
    assert {f"runs/{run_name}/best/weights.safetensors", f"runs/{run_name}/best/config.yaml"} <= set(keys)
    assert any("/deepspeed/state/" in k and k.endswith("optim_states.pt") for k in keys)
    info = json.loads(storage.location(f"{run_uri}/rsrefseg_run.json").read_text())
    assert info["finished"] and [row["epoch"] for row in info["finished"]["history"]] == [1, 2, 3]
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # Epoch 1 came from the bucket's checkpoint: validated and logged once, not trained again.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/gIoU")) == [1, 2, 3]
    # No credential anywhere in MLflow params or the bucket's records; no folder of this machine
    # (the project folder) in the params or the checkpoint, which travel to other machines.
    records = [s3_server.read(s3_bucket, k).decode() for k in keys if k.endswith((".yaml", ".json"))]
    params = list(run.data.params.values())
    assert not [t for t in params + records for secret in s3_server.admin if secret in t]
    checkpoint_config = storage.location(f"{run_uri}/best/config.yaml").read_text()
    assert not [t for t in params + [checkpoint_config] if str(home) in t]
    assert run.data.params["train.storage_path"] == f"s3://{s3_bucket}/runs"

    # A finished run resumed from the bucket trains nothing.
    assert main(["train", "--resume", run_uri]) == 0
    assert "already finished" in capsys.readouterr().out

    # Evaluate, predict and register read the best checkpoint from the bucket.
    report = home / "test.json"
    assert main(["evaluate", "--checkpoint", run_uri, "--split", "test", "--out", str(report),
                 f"tracking.uri=sqlite:///{home / 'mlflow.db'}", "tracking.experiment=s3"]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["checkpoint"] == run_uri and evaluated["metrics"]["count"] > 0
    image = home / "scene.png"
    Image.fromarray(np.full((96, 96, 3), 120, np.uint8)).save(image)
    assert main(["predict", "--checkpoint", f"{run_uri}/best", "--image", str(image), "--text", "road",
                 "--out", str(home / "mask.png"), "--cpu"]) == 0
    assert Image.open(home / "mask.png").size == (96, 96)
    assert main(["register", "--checkpoint", run_uri, "--name", "s3-model",
                 f"tracking.uri=sqlite:///{home / 'mlflow.db'}"]) == 0
    (version,) = client.search_model_versions("name='s3-model'")
    assert client.get_run(version.run_id).data.tags["rsrefseg.checkpoint"] == run_uri
