"""Run folders (RUN_INFO beside Ray Train's checkpoints): names, moves, finished runs. No Ray."""

from __future__ import annotations

import shutil

import pytest

from rsrefseg.jobs import train
from tests.models.helpers import tiny_config


def _saved_run(root, name: str, finished: dict | None = None):
    cfg = tiny_config([f"train.storage_path={root}"])
    train._write_run_info(root / name, cfg, "mlflow-id", finished=finished)
    return cfg


def test_nested_run_names_are_kept(tmp_path):
    # A Tune trial's run is `<sweep>/trials/<id>`: continuing it must find that folder again,
    # not a top-level `<id>` folder where Ray Train would start from scratch.
    _saved_run(tmp_path, "sweep/trials/t1")
    for ref in ("sweep/trials/t1", str(tmp_path / "sweep" / "trials" / "t1")):
        saved = train._load_run_info(tmp_path, ref)
        assert saved.name == "sweep/trials/t1"
        assert train.storage_root(saved.cfg) / saved.name == tmp_path / "sweep" / "trials" / "t1"
        assert saved.mlflow_run_id == "mlflow-id" and saved.finished is None


def test_a_moved_run_folder_continues_where_it_is_now(tmp_path):
    _saved_run(tmp_path / "old", "run-a")
    shutil.move(tmp_path / "old" / "run-a", tmp_path / "new-home")
    saved = train._load_run_info(tmp_path, str(tmp_path / "new-home"))
    assert train.storage_root(saved.cfg) / saved.name == tmp_path / "new-home"


def test_a_finished_run_is_not_trained_again(tmp_path, monkeypatch, capsys):
    history = [{"epoch": 1, "val/gIoU": 10.0}, {"epoch": 2, "val/gIoU": 12.5}]
    cfg = _saved_run(tmp_path, "done", finished={"best_metrics": history[1], "history": history})

    def no_ray(*_args, **_kwargs):
        raise AssertionError("a finished run must not start Ray or touch its MLflow run")

    monkeypatch.setattr(train, "init_ray", no_ray)
    monkeypatch.setattr(train, "preflight", no_ray)
    for call in ({"resume": "done"}, {"name": "done"}):  # `train --resume`, and a restarted Tune trial
        outcome = train.run_train(cfg, **call)
        assert outcome.already_finished and outcome.history == history
        assert outcome.best_metrics == history[1] and outcome.run_dir == tmp_path / "done"
        assert "had already finished" in capsys.readouterr().out


def test_unknown_run_names_the_folders_there_are(tmp_path):
    _saved_run(tmp_path, "run-a")
    with pytest.raises(train.ConfigError, match="run-a"):
        train._load_run_info(tmp_path, "run-b")


def test_resume_takes_a_folder_path_as_typed_or_a_name(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    _saved_run(root, "run-a")
    monkeypatch.chdir(tmp_path)  # the README's `--resume runs/<run-name>`, from the project folder
    for ref in ("runs/run-a", "run-a"):
        saved = train._load_run_info(root, ref)
        assert saved.name == "run-a" and train.storage_root(saved.cfg) == root


def test_sweep_folder_as_typed_or_a_name(tmp_path, monkeypatch):
    from rsrefseg.jobs import tune

    (tmp_path / "runs" / "sw").mkdir(parents=True)
    (tmp_path / "runs" / "sw" / tune.SWEEP_INFO).write_text("{}")
    monkeypatch.chdir(tmp_path)
    for ref in ("runs/sw", "sw", str(tmp_path / "runs" / "sw")):
        assert tune.sweep_folder(tmp_path / "runs", ref) == tmp_path / "runs" / "sw"
    with pytest.raises(train.ConfigError, match=r"sweeps under .*: sw"):
        tune.sweep_folder(tmp_path / "runs", "other")


@pytest.mark.parametrize("job, extra", [("train", ["train.epochs=3"]), ("tune", ["--sweep", "s.yaml"]),
                                        ("tune", ["--config", "configs/demo.yaml"])])
def test_resume_refuses_what_it_would_ignore(job, extra, capsys):
    from rsrefseg.cli import main

    assert main([job, "--resume", "runs/x", *extra]) == 2
    assert "--resume continues" in capsys.readouterr().err
