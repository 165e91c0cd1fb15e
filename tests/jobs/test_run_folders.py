"""Run folders (platform/runs.py): names, moves, finished runs, sweeps, checkpoints. No Ray."""

from __future__ import annotations

import shutil

import pytest

from rsrefseg.jobs import session, train
from rsrefseg.models.checkpoint_folder import CONFIG_FILE, WEIGHTS_FILE, find_checkpoint
from rsrefseg.platform import runs
from rsrefseg.platform.errors import ConfigError
from tests.models.helpers import tiny_config


def _saved_run(root, name: str, finished: dict | None = None):
    cfg = tiny_config([f"train.storage_path={root}"])
    runs.create_run(root / name, cfg, "mlflow-id")
    if finished:
        runs.finish_run(root / name, cfg, "mlflow-id", **finished)
    return cfg


def test_nested_run_names_are_kept(tmp_path):
    # A Tune trial's run is `<sweep>/trials/<id>`: continuing it must find that folder again,
    # not a top-level `<id>` folder where Ray Train would start from scratch.
    _saved_run(tmp_path, "sweep/trials/t1")
    for ref in ("sweep/trials/t1", str(tmp_path / "sweep" / "trials" / "t1")):
        saved = runs.open_run(tmp_path, ref)
        assert saved.name == "sweep/trials/t1"
        assert runs.storage_root(saved.cfg) / saved.name == tmp_path / "sweep" / "trials" / "t1"
        assert saved.mlflow_run_id == "mlflow-id" and saved.finished is None


def test_a_moved_run_folder_continues_where_it_is_now(tmp_path):
    _saved_run(tmp_path / "old", "run-a")
    shutil.move(tmp_path / "old" / "run-a", tmp_path / "new-home")
    saved = runs.open_run(tmp_path, str(tmp_path / "new-home"))
    assert runs.storage_root(saved.cfg) / saved.name == tmp_path / "new-home"


def test_a_finished_run_is_not_trained_again(tmp_path, monkeypatch, capsys):
    history = [{"epoch": 1, "val/gIoU": 10.0}, {"epoch": 2, "val/gIoU": 12.5}]
    cfg = _saved_run(tmp_path, "done", finished={"best_metrics": history[1], "history": history})

    def no_ray(*_args, **_kwargs):
        raise AssertionError("a finished run must not start Ray or touch its MLflow run")

    monkeypatch.setattr(session, "start_ray", no_ray)
    monkeypatch.setattr(train, "preflight", no_ray)
    for call in ({"resume": "done"}, {"name": "done"}):  # `train --resume`, and a restarted Tune trial
        outcome = train.run_train(cfg, **call)
        assert outcome.already_finished and outcome.history == history
        assert outcome.best_metrics == history[1] and outcome.run_dir == tmp_path / "done"
        assert "had already finished" in capsys.readouterr().out


def test_unknown_run_names_the_folders_there_are(tmp_path):
    _saved_run(tmp_path, "run-a")
    with pytest.raises(ConfigError, match="run-a"):
        runs.open_run(tmp_path, "run-b")


def test_resume_takes_a_folder_path_as_typed_or_a_name(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    _saved_run(root, "run-a")
    monkeypatch.chdir(tmp_path)  # the README's `--resume runs/<run-name>`, from the project folder
    for ref in ("runs/run-a", "run-a"):
        saved = runs.open_run(root, ref)
        assert saved.name == "run-a" and runs.storage_root(saved.cfg) == root


def test_sweep_folder_as_typed_or_a_name(tmp_path, monkeypatch):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("mode: grid\n")
    cfg = tiny_config([f"train.storage_path={tmp_path / 'runs'}"])
    runs.create_sweep(tmp_path / "runs" / "sw", cfg, str(sweep_file), "parent-id")
    sweep_file.unlink()  # a resume reads the sweep folder's own copy
    monkeypatch.chdir(tmp_path)
    for ref in ("runs/sw", "sw", str(tmp_path / "runs" / "sw")):
        saved = runs.open_sweep(tmp_path / "runs", ref)
        assert saved.sweep_dir == tmp_path / "runs" / "sw" and saved.parent_run_id == "parent-id"
        assert saved.base == cfg and saved.sweep_file_copy.read_text() == "mode: grid\n"
    with pytest.raises(ConfigError, match=r"sweeps under .*: sw"):
        runs.open_sweep(tmp_path / "runs", "other")


@pytest.mark.parametrize("job, extra", [("train", ["train.epochs=3"]), ("tune", ["--sweep", "s.yaml"]),
                                        ("tune", ["--config", "configs/demo.yaml"])])
def test_resume_refuses_what_it_would_ignore(job, extra, capsys):
    from rsrefseg.cli import main

    assert main([job, "--resume", "runs/x", *extra]) == 2
    assert "--resume continues" in capsys.readouterr().err


def test_checkpoint_names_a_model_folder_a_run_or_a_ray_checkpoint(tmp_path):
    model = tmp_path / "run" / runs.BEST_DIR
    model.mkdir(parents=True)
    (model / WEIGHTS_FILE).write_bytes(b"")
    ray_ckpt = tmp_path / "checkpoint_000001" / runs.MODEL_DIR
    ray_ckpt.mkdir(parents=True)
    (ray_ckpt / CONFIG_FILE).write_text("")
    assert find_checkpoint(model) == model
    assert find_checkpoint(tmp_path / "run") == model
    assert find_checkpoint(tmp_path / "checkpoint_000001") == ray_ckpt
    with pytest.raises(ConfigError, match="not a checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        find_checkpoint(tmp_path / "nothing")


def test_a_trial_is_a_run_folder_inside_its_sweep(tmp_path):
    cfg = tiny_config([f"train.storage_path={tmp_path}"])
    name = runs.trial_name("sw", "t_0001")
    runs.create_run(tmp_path / name, cfg, "run-1")
    runs.create_run(tmp_path / runs.trial_name("sw", "t_0002"), cfg, "run-2")
    runs.finish_run(tmp_path / runs.trial_name("sw", "t_0002"), cfg, "run-2", best_metrics={"epoch": 1},
                    history=[{"epoch": 1}])
    found = runs.trial_runs(tmp_path / "sw")
    assert sorted(found) == ["t_0001", "t_0002"]
    assert found["t_0001"]["mlflow_run_id"] == "run-1" and "finished" not in found["t_0001"]
    assert found["t_0002"]["finished"]["best_metrics"] == {"epoch": 1}
    assert runs.find_run(tmp_path, name).name == name and runs.find_run(tmp_path, "sw/trials/none") is None
