"""The train, evaluate and predict jobs end to end, through the real CLI, on a 2-worker CPU run.

One training run (module-scoped) feeds most assertions: it is the expensive part.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsrefseg.cli import main
from tests.network import train_worker_pids

pytestmark = pytest.mark.slow

EPOCHS = 3


def train_args(prepared: Path, home: Path, *extra: str) -> list[str]:
    return [
        "train", "--config", str(Path(__file__).resolve().parents[2] / "configs/demo.yaml"),
        f"data.path={prepared}", f"train.epochs={EPOCHS}", "train.batch_size=4",
        "train.log_every_n_steps=2", "train.figure_samples=2",
        f"tracking.uri=sqlite:///{home / 'mlflow.db'}", "tracking.experiment=e2e",
        f"train.storage_path={home / 'runs'}", "tracking.system_metrics_s=1", *extra,
    ]


@pytest.fixture(scope="module")
def trained(ray_session, prepared_dataset, tmp_path_factory):
    # The one training run of this module, and not an easy one. A worker is killed once the first
    # checkpoint exists: with train.max_failures=1 the group restarts from it. Another is killed
    # once the second exists: one failure too many, so the run fails (FAILED in MLflow) and
    # `rsrefseg train --resume` finishes it. Every test below asserts on a run that lived
    # through that.
    from mlflow.tracking import MlflowClient

    home = tmp_path_factory.mktemp("train-home")
    args = train_args(prepared_dataset, home, "tracking.run_name=e2e", "train.register_as=e2e-model",
                      "train.max_failures=1")
    rc, kills = _run_and_kill_a_worker_after_checkpoints(args, home / "runs", epochs=(1, 2))
    assert kills == 2, "training ended before two workers could be killed"
    assert rc != 0
    (run_dir,) = [p for p in (home / "runs").iterdir() if p.name.startswith("e2e-")]
    run_id = json.loads((run_dir / "rsrefseg_run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    failed = {"status": client.get_run(run_id).info.status, "epochs": _val_steps(home, run_id)}
    assert main(["train", "--resume", str(run_dir)]) == 0
    return home, run_dir, failed


def context(dataset_input) -> str:
    return {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"]


def mlflow_run(home: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`rsrefseg.job` = 'train'")
    return client, run


def test_training_uses_deepspeed_zero2_on_two_workers(trained):
    _, run_dir, _ = trained
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert ckpts, "no checkpoint reported to Ray Train"
    ds_dir = ckpts[-1] / "deepspeed" / "state"
    # ZeRO partitions the optimizer state: one shard per data-parallel rank.
    shards = sorted(p.name for p in ds_dir.glob("*optim_states.pt"))
    assert len(shards) == 2 and all("zero_pp_rank_" in s for s in shards), shards
    state = json.loads((ckpts[-1] / "state.json").read_text())
    assert state["epoch"] == EPOCHS
    assert (run_dir / "best" / "weights.safetensors").is_file()
    assert (run_dir / "best" / "config.yaml").is_file()


def test_mlflow_run_has_params_metrics_and_artifacts(trained, prepared_dataset):
    home, _, _ = trained
    client, run = mlflow_run(home)
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key in ("model.preset", "model.lora.sam_rank", "model.prompter.downsample_rate", "train.epochs",
                "data.path", "model.trainable_params", "model.total_params", "version.torch", "version.ray"):
        assert key in params, key
    assert params["train.epochs"] == str(EPOCHS)
    assert params["train.deepspeed_zero_stage"] == "2"  # what the engine ran, not what was asked
    assert int(params["model.trainable_params"]) < int(params["model.total_params"])
    tags = run.data.tags
    assert tags["rsrefseg.git_commit"]
    assert len(tags["rsrefseg.dataset_hash"]) == 64
    epochs = client.get_metric_history(run.info.run_id, "val/gIoU")
    assert sorted(m.step for m in epochs) == list(range(1, EPOCHS + 1))
    # Each epoch validated every val sample exactly once across the two workers' shards.
    val_count = json.loads((prepared_dataset / "manifest.json").read_text())["counts"]["val"]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/count")] == [val_count] * EPOCHS
    for key in ("val/cIoU", "val/Pr_0.5", "val/Pr_0.9", "train/lr", "train/samples_per_s", "best/gIoU"):
        assert client.get_metric_history(run.info.run_id, key), key
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    third = max(1, len(losses) // 3)  # windows of two steps are noisy: compare the first and last thirds
    assert sum(losses[-third:]) < sum(losses[:third]), f"loss did not decrease: {losses}"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
    assert "checkpoints/best/weights.safetensors" in names
    assert {a.path for a in client.list_artifacts(run.info.run_id, "metrics")} == {"metrics/epochs.csv"}
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "val_predictions")}
    assert f"val_predictions/epoch_{EPOCHS:03d}.png" in figures
    # The dataset it trained on (digest = the manifest's content hash), in the model-training view,
    # with system metrics from each node's first worker.
    manifest = json.loads((prepared_dataset / "manifest.json").read_text())
    inputs = {context(i): i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"} and inputs["train"].digest == manifest["content_hash"][:32]
    assert json.loads(inputs["train"].source) == {"uri": str(prepared_dataset), "split": "train"}
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    import socket

    assert f"system/{socket.gethostname()}/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    # train.register_as: the best checkpoint is version 1 of the registered model, linked to this run.
    (version,) = client.search_model_versions("name='e2e-model'")
    assert str(version.version) == "1"  # an int in newer MLflow clients
    assert client.get_run(version.run_id).data.tags["rsrefseg.source_run"] == run.info.run_id
    # The resolved config and the recipe file as the user wrote it.
    assert {"config/resolved.yaml", "config/demo.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id, "config")}


def test_evaluate_prints_row_and_writes_json(trained, prepared_dataset, capsys):
    home, run_dir, _ = trained
    out = home / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--split", "test", "--out", str(out),
                 f"tracking.uri=sqlite:///{home / 'mlflow.db'}", "tracking.experiment=e2e"]) == 0
    printed = capsys.readouterr().out
    assert "gIoU (=mIoU)" in printed and "cIoU (=oIoU)" in printed and "IoU > X" in printed
    assert "by category" in printed and "by object size" in printed
    result = json.loads(out.read_text())
    manifest = json.loads((prepared_dataset / "manifest.json").read_text())
    assert result["metrics"]["count"] == manifest["counts"]["test"]
    assert 0.0 <= result["metrics"]["gIoU"] <= 100.0
    # breakdowns: every category of the split, groups that partition the samples
    assert set(result["by_category"]) == set(manifest["categories"]["test"])
    assert {k: v["count"] for k, v in result["by_category"].items()} == manifest["categories"]["test"]
    assert sum(v["count"] for v in result["by_size"].values()) == result["metrics"]["count"]
    # one Parquet row per sample; their sums give the overall cIoU and their mean IoU the gIoU
    import pyarrow.parquet as pq

    rows = pq.read_table(result["samples"]).to_pylist()
    assert len(rows) == manifest["counts"]["test"] and len({r["id"] for r in rows}) == len(rows)
    assert 100 * sum(r["intersection"] for r in rows) / sum(r["union"] for r in rows) == pytest.approx(result["metrics"]["cIoU"])
    assert 100 * sum(r["iou"] for r in rows) / len(rows) == pytest.approx(result["metrics"]["gIoU"])
    # The evaluation is an MLflow run of its own, with the same figures.
    client, _ = mlflow_run(home)
    exp = client.get_experiment_by_name("e2e")
    (ev,) = client.search_runs([exp.experiment_id], filter_string="tags.`rsrefseg.job` = 'evaluate'")
    assert ev.info.status == "FINISHED"
    assert ev.data.metrics["test/gIoU"] == pytest.approx(result["metrics"]["gIoU"])
    (evaluated,) = client.get_run(ev.info.run_id).inputs.dataset_inputs
    assert context(evaluated) == "evaluation" and evaluated.dataset.digest == manifest["content_hash"][:32]
    assert {a.path for a in client.list_artifacts(ev.info.run_id, "evaluation")} == {
        "evaluation/test.json", "evaluation/test.samples.parquet", "evaluation/test_gallery.png"}


def test_evaluate_on_val_matches_the_best_epochs_validation(trained, capsys):
    """Ray Data replicas and training's validation share one forward and metric path."""
    home, run_dir, _ = trained
    result_path = home / "val.json"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--split", "val", "--out", str(result_path),
                 "tracking.enabled=false"]) == 0
    result = json.loads(result_path.read_text())
    client, run = mlflow_run(home)
    best_epoch = int(run.data.metrics["best/epoch"]) if "best/epoch" in run.data.metrics else None
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/gIoU")}
    best_epoch = best_epoch or max(history, key=history.get)
    # Every overall figure of that epoch, not only the one checkpoints are ranked by.
    for key in ("gIoU", "cIoU", "Pr@0.5", "Pr@0.7", "Pr@0.9"):
        name = "val/" + key.replace("@", "_")  # MLflow's metric names have no "@"
        values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert result["metrics"][key] == pytest.approx(values[best_epoch], abs=1e-3), key


def test_predict_writes_mask_at_image_size(trained, synthetic_root, tmp_path):
    _, run_dir, _ = trained
    image = tmp_path / "scene.png"
    # A non-square image of another size: resized in, mask resized back out.
    rgb = np.asarray(Image.open(next((synthetic_root / "images").glob("*.tif"))).convert("RGB"))
    Image.fromarray(rgb[:300, :400]).save(image)
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    assert main(["predict", "--checkpoint", str(run_dir / "best"), "--image", str(image),
                 "--text", "vehicle in the parking area", "--out", str(out), "--overlay", str(overlay)]) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (300, 400)
    assert set(np.unique(mask)) <= {0, 255}
    assert Image.open(overlay).size == (400, 300)


def test_corrupt_and_wrong_model_checkpoints_fail_clearly(trained, tmp_path, capsys):
    import shutil

    _, run_dir, _ = trained
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir / "best", corrupt)
    data = (corrupt / "weights.safetensors").read_bytes()
    (corrupt / "weights.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["evaluate", "--checkpoint", str(corrupt)]) == 2
    assert "weights.safetensors" in capsys.readouterr().err

    wrong = tmp_path / "wrong"
    shutil.copytree(run_dir / "best", wrong)
    cfg_text = (wrong / "config.yaml").read_text()
    (wrong / "config.yaml").write_text(cfg_text.replace("downsample_rate: 2", "downsample_rate: 8")
                                       .replace("sam_rank: 8", "sam_rank: 4"))
    assert main(["evaluate", "--checkpoint", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "weights.safetensors" in err or "checkpoint" in err.lower()

    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_config_fails_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    from rsrefseg.jobs import session
    from rsrefseg.platform import ray_session

    # Whether or not this test process already holds a Ray session, reaching Ray is the failure.
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was reached before the config was checked")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(session, "start_ray", no_ray)
    monkeypatch.setattr(ray_session, "init_ray", no_ray)
    was = ray.is_initialized()
    assert main(["train", "--config", "configs/demo.yaml", "model.lora.sam_rank=0",
                 f"train.storage_path={tmp_path}"]) == 2
    assert "model.lora.sam_rank" in capsys.readouterr().err
    assert main(["train", "--config", "configs/demo.yaml", f"data.path={tmp_path / 'nope'}",
                 f"train.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'} does not exist" in err and "rsrefseg prepare" in err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--config", "configs/demo.yaml", f"data.path={tmp_path / 'empty'}",
                 f"train.storage_path={tmp_path}"]) == 2
    assert "manifest.json" in capsys.readouterr().err  # a folder that is not a prepared dataset
    # A run that would register its model with MLflow turned off fails now, not after training.
    assert main(["train", "--config", "configs/demo.yaml", "train.register_as=demo", "tracking.enabled=false",
                 f"train.storage_path={tmp_path}"]) == 2
    assert "train.register_as" in capsys.readouterr().err
    assert ray.is_initialized() == was


def _checkpointed_epoch(storage: Path) -> int:
    """The last epoch of any checkpoint under the run folders in `storage` (0: none yet)."""
    epochs = [0]
    for state in storage.glob("*/checkpoint_*/state.json"):
        try:
            epochs.append(json.loads(state.read_text())["epoch"])
        except (OSError, ValueError, KeyError):  # still being written
            pass
    return max(epochs)


def _run_and_kill_a_worker_after_checkpoints(args: list[str], storage: Path, epochs: tuple[int, ...]):
    """Run `main(args)` in a thread; SIGKILL one train worker as soon as a checkpoint of each of
    `epochs` exists.

    Returns (exit code, how many workers were killed)."""
    import os
    import signal
    import threading
    import time

    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(args)))
    thread.start()
    kills = 0
    deadline = time.time() + 600
    while thread.is_alive() and kills < len(epochs) and time.time() < deadline:
        if _checkpointed_epoch(storage) >= epochs[kills]:
            pids = train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                kills += 1
        time.sleep(0.1)
    thread.join(timeout=900)
    return result.get("rc"), kills


def _val_steps(home: Path, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, "val/gIoU"))


def test_killed_worker_restarts_from_checkpoint_without_repeating_epochs(trained):
    home, run_dir, _ = trained
    info = json.loads((run_dir / "rsrefseg_run.json").read_text())
    # Every epoch validated and logged exactly once, although the group restarted mid-run.
    assert _val_steps(home, info["mlflow_run_id"]) == list(range(1, EPOCHS + 1))
    (latest,) = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1:]
    history = json.loads((latest / "state.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))


def test_failed_run_continues_with_resume(trained, capsys):
    from mlflow.tracking import MlflowClient

    home, run_dir, failed = trained
    # The second kill failed the run, as a crash with no restarts left does; epochs done before it
    # were logged once each.
    assert failed["status"] == "FAILED"
    assert failed["epochs"] and failed["epochs"] == list(range(1, len(failed["epochs"]) + 1))
    assert len(failed["epochs"]) < EPOCHS
    # `--resume` went on in the same MLflow run: every epoch once, and the run is now finished.
    run_id = json.loads((run_dir / "rsrefseg_run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert _val_steps(home, run_id) == list(range(1, EPOCHS + 1))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert (run_dir / "best" / "weights.safetensors").is_file()

    # Resuming a finished run trains nothing and leaves its MLflow run as it was.
    end_time = client.get_run(run_id).info.end_time
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "had already finished" in capsys.readouterr().out
    assert client.get_run(run_id).info.end_time == end_time
    assert _val_steps(home, run_id) == list(range(1, EPOCHS + 1))
