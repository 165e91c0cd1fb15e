"""What `rsrefseg submit` ships: the package's code and recipes, never the working directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsrefseg.jobs import submit
from rsrefseg.platform.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An unrelated folder to run from, holding what must never travel (as a home folder does)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text("secret")
    monkeypatch.chdir(home)
    return home


def installed_package(site: Path) -> Path:
    """A package laid out as a wheel installs it: site-packages/rsrefseg with its configs/."""
    pkg = site / "rsrefseg"
    (pkg / "configs" / "sweeps").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configs" / "demo.yaml").write_text("")
    return pkg


def never_names(env: dict, folder: Path) -> bool:
    """No path in the runtime env is `folder` or inside it."""
    text = json.dumps(env)
    return str(folder) not in text


def test_a_checkout_ships_itself_and_its_package_from_any_folder(home):
    env = submit.runtime_env()
    assert env["working_dir"] == str(REPO)
    assert env["py_modules"] == [str(REPO / "src" / "rsrefseg")]
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert never_names(env, home)


def test_an_installed_package_ships_only_itself(home, tmp_path, monkeypatch):
    pkg = installed_package(tmp_path / "site-packages")
    monkeypatch.setattr(submit, "PACKAGE", pkg)
    env = submit.runtime_env()
    assert "working_dir" not in env
    assert env["py_modules"] == [str(pkg)]
    assert never_names(env, home)


def test_a_package_without_its_recipes_is_refused(home, tmp_path, monkeypatch):
    pkg = installed_package(tmp_path / "site-packages")
    (pkg / "configs" / "demo.yaml").unlink()
    (pkg / "configs" / "sweeps").rmdir()
    (pkg / "configs").rmdir()
    monkeypatch.setattr(submit, "PACKAGE", pkg)
    with pytest.raises(UserError, match="cannot ship the code") as err:
        submit.runtime_env()
    assert "\n" not in str(err.value)
    monkeypatch.setattr(submit, "PACKAGE", tmp_path / "nowhere")
    with pytest.raises(submit.CodeNotFound):
        submit.runtime_env()


def test_local_recipe_files_that_do_not_travel_are_named(home, tmp_path, monkeypatch):
    (home / "mine.yaml").write_text("")
    job = ["--", "tune", "--config", "mine.yaml", "--sweep", "ablation", "train.epochs=1"]
    checkout_env = submit.runtime_env()
    assert submit.local_files_left_behind(job, checkout_env) == []  # the checkout travels
    monkeypatch.setattr(submit, "PACKAGE", installed_package(tmp_path / "site-packages"))
    installed_env = submit.runtime_env()
    assert submit.local_files_left_behind(job, installed_env) == ["--config mine.yaml"]
    (home / "configs").mkdir()
    (home / "configs" / "demo.yaml").write_text("")  # a shipped recipe's name: the job finds its own copy
    assert submit.local_files_left_behind(["train", "--config", "configs/demo.yaml"], installed_env) == []
