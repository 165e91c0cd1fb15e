"""`--config` and `--sweep` take a file or the name of a recipe the package ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsrefseg.platform import recipes
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.paths import HOME_ENV
from rsrefseg.platform.recipes import find_recipe, shipped

REPO = Path(__file__).resolve().parents[2]
PACKAGE_CONFIGS = REPO / "src" / "rsrefseg" / "configs"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An unrelated working directory, with no project root of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(HOME_ENV, raising=False)
    return tmp_path


def test_the_recipes_live_in_the_package_and_the_checkout_links_to_them():
    assert recipes.SHIPPED == PACKAGE_CONFIGS
    assert (REPO / "configs").is_symlink() and (REPO / "configs").resolve() == PACKAGE_CONFIGS
    assert {"demo", "rsrefseg-b-rrsisd", "rsrefseg-l-refsegrs"} <= set(shipped())
    assert {"ablation", "grid", "variants"} <= set(shipped("sweep"))
    assert "sweeps" not in shipped()


@pytest.mark.parametrize("name", ["demo", "demo.yaml", "configs/demo.yaml", " demo "])
def test_a_shipped_recipe_by_name_from_any_folder(name, elsewhere):
    assert find_recipe(name) == PACKAGE_CONFIGS / "demo.yaml"


@pytest.mark.parametrize("name", ["ablation", "sweeps/ablation", "ablation.yaml", "configs/sweeps/ablation.yaml"])
def test_a_shipped_sweep_by_name(name, elsewhere):
    assert find_recipe(name, kind="sweep") == PACKAGE_CONFIGS / "sweeps" / "ablation.yaml"


def test_a_file_wins_over_a_name(elsewhere):
    (elsewhere / "demo").write_text("train: {epochs: 1}\n")
    assert find_recipe("demo") == Path("demo")  # as given, relative to the working directory
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "demo.yaml").write_text("train: {epochs: 1}\n")
    assert find_recipe("configs/demo.yaml") == Path("configs/demo.yaml")
    assert find_recipe(str(elsewhere / "demo")) == elsewhere / "demo"


def test_a_file_under_the_project_root(elsewhere, tmp_path_factory, monkeypatch):
    project = tmp_path_factory.mktemp("project")
    (project / "mine.yaml").write_text("train: {epochs: 1}\n")
    with pytest.raises(ConfigError):
        find_recipe("mine.yaml")
    monkeypatch.setenv(HOME_ENV, str(project))
    assert find_recipe("mine.yaml") == project / "mine.yaml"


def test_an_unknown_name_lists_the_shipped_ones(elsewhere):
    with pytest.raises(ConfigError) as err:
        find_recipe("dmeo")
    message = str(err.value)
    assert message.startswith("--config dmeo: not found") and "\n" not in message
    assert all(name in message for name in shipped())
    with pytest.raises(ConfigError, match=r"--sweep nope: .*shipped: ablation, ablation-rsrefseg2, arch, grid, variants"):
        find_recipe("nope", kind="sweep")


def test_names_do_not_cross_kinds_or_leave_the_folder(elsewhere):
    with pytest.raises(ConfigError):
        find_recipe("ablation")  # a sweep, not a recipe
    with pytest.raises(ConfigError):
        find_recipe("sweeps/ablation")
    with pytest.raises(ConfigError):
        find_recipe("demo", kind="sweep")
    with pytest.raises(ConfigError):
        find_recipe("../configs/demo", kind="sweep")
    with pytest.raises(ConfigError):
        find_recipe("")
    with pytest.raises(ValueError):
        find_recipe("demo", kind="recipes")


def test_the_cli_records_the_file_a_name_stands_for(elsewhere):
    """A run given `--config demo` logs the recipe file itself (MLflow artifact config/demo.yaml)."""
    from rsrefseg.cli import _recipe

    assert _recipe("demo") == str(PACKAGE_CONFIGS / "demo.yaml")
    assert _recipe(None) is None


def test_load_sweep_takes_a_name(elsewhere):
    from rsrefseg.jobs.tune import DEFAULT_SWEEP
    from rsrefseg.platform.config import load_config
    from rsrefseg.training.sweep import load_sweep

    sweep = load_sweep(DEFAULT_SWEEP, load_config(find_recipe("rsrefseg-b-rrsisd")))
    assert sweep.source == str(PACKAGE_CONFIGS / "sweeps" / "ablation.yaml") and sweep.trials()
    with pytest.raises(ConfigError, match="--sweep nope: not found"):
        load_sweep("nope", load_config(None))
