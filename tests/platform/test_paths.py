"""Where a config's relative paths resolve (paths.root, else RSREFSEG_HOME, else the working
directory), and what a missing one says: the key, the absolute path tried, the host."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rsrefseg.cli import main
from rsrefseg.jobs.submit import runtime_env, run_submit
from rsrefseg.jobs.session import resolve as resolve_paths
from rsrefseg.platform import paths
from rsrefseg.platform.config import load_config
from rsrefseg.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("data.path", "data/demo/prepared", "{root}/data/demo/prepared"),
        ("data.path", "/elsewhere/prepared", "/elsewhere/prepared"),
        ("data.path", "s3://bucket/prepared", "s3://bucket/prepared"),
        ("model.siglip_path", "weights/siglip-so400m-patch14-384", "{root}/weights/siglip-so400m-patch14-384"),
        ("model.sam_checkpoint", "weights/sam_vit_b_01ec64.pth", "{root}/weights/sam_vit_b_01ec64.pth"),
        ("train.storage_path", "runs", "{root}/runs"),
        ("tracking.uri", "sqlite:///mlflow.db", "sqlite:///{root}/mlflow.db"),
        ("tracking.uri", "http://head:5000", "http://head:5000"),
        ("tracking.artifact_location", "mlartifacts", "file://{root}/mlartifacts"),
    ],
)
def test_relative_paths_resolve_against_paths_root(tmp_path, monkeypatch, key, value, expected):
    monkeypatch.chdir(tmp_path)  # the working directory is not the root here: it must not matter
    root = tmp_path / "project"
    cfg = resolve_paths(load_config(None, [f"paths.root={root}", f"{key}={value}"]))
    assert cfg.flat()[key] == expected.format(root=root)


def test_empty_root_is_rsrefseg_home_else_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_paths(load_config(None)).data.path == str(tmp_path / "data/demo/prepared")

    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path / "home"))
    cfg = resolve_paths(load_config(None))
    assert cfg.data.path == str(tmp_path / "home/data/demo/prepared")
    # The root is recorded: a Tune trial resolving its own overrides elsewhere gets the same answer.
    monkeypatch.delenv(paths.HOME_ENV)
    monkeypatch.chdir(tmp_path.parent)
    assert resolve_paths(cfg.replace({"data.path": "data/other"})).data.path == str(tmp_path / "home/data/other")


def test_a_missing_path_names_the_key_the_absolute_path_and_the_host(tmp_path):
    cfg = load_config(None, [f"paths.root={tmp_path}"])
    with pytest.raises(paths.MissingPath) as err:
        paths.require(cfg, ["data.path"])
    message = str(err.value)
    assert message.startswith(f"data.path: {tmp_path / 'data/demo/prepared'} does not exist on host {socket.gethostname()} ")
    assert "(expected: a folder written by `rsrefseg prepare`)" in message
    assert f"paths.root, here {tmp_path}" in message and "rsrefseg submit --root DIR" in message


def test_train_with_a_missing_relative_dataset_fails_before_ray_with_the_absolute_path(tmp_path, capsys):
    rc = main(["train", "--config", str(REPO / "configs/demo.yaml"), f"paths.root={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{tmp_path / 'data/demo/prepared'} does not exist on host {socket.gethostname()}" in err


def test_submit_root_becomes_the_jobs_project_folder():
    assert runtime_env("/home/ray/rsrefseg")["env_vars"][paths.HOME_ENV] == "/home/ray/rsrefseg"
    assert paths.HOME_ENV not in runtime_env()["env_vars"]  # the nodes' own RSREFSEG_HOME applies
    with pytest.raises(ConfigError, match="absolute path"):
        run_submit(["--", "train"], address="http://127.0.0.1:9", root="relative/root")
