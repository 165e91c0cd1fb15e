"""The wheel is the package: installed apart from the checkout, it finds its own recipes.

The wheel is built from a copy of the sources (pyproject.toml, README.md, src/), so that the
build leaves no build/ folder in the checkout (setuptools keeps build/lib between builds, and a
file removed from src/ would live on in later wheels). It is installed into a folder of its own
and run from an empty working directory with that folder first on PYTHONPATH, so the wheel's
copy of rsrefseg wins over the editable install of the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "src" / "rsrefseg" / "configs"
# The smallest demo that still trains and evaluates: 60 synthetic triplets (36 train), one epoch,
# one train worker (the wheel's recipes and code are the subject here, not two ZeRO-2 ranks).
TINY_DEMO = ["demo", "--config", "demo", "--size", "60", "train.epochs=1", "train.batch_size=4",
             "train.num_workers=1"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist"), str(source)], check=True, timeout=300)
    (built,) = (tmp / "dist").glob("rsrefseg-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel) -> Path:
    target = wheel.parent.parent / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    return target


@pytest.fixture
def apart(site, tmp_path) -> tuple[Path, dict]:
    """An empty working directory and an environment in which `import rsrefseg` is the wheel's."""
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RSREFSEG_HOME", "RAY_ADDRESS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), PYTHONUNBUFFERED="1")
    return work, env


def python(code: str, work: Path, env: dict) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_wheel_holds_the_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(RECIPES.parent.parent).as_posix() for p in RECIPES.rglob("*.yaml")}
    assert {"rsrefseg/configs/demo.yaml", "rsrefseg/configs/sweeps/ablation.yaml"} <= shipped
    assert shipped <= names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert re.search(r"^Requires-Dist: pydantic>=", zipfile.ZipFile(wheel).read(metadata).decode(), re.M)


def test_the_installed_package_finds_its_recipes_and_ships_only_itself(apart, site):
    work, env = apart
    out = json.loads(python(
        "import json, rsrefseg\n"
        "from rsrefseg.platform.recipes import find_recipe\n"
        "from rsrefseg.jobs.submit import runtime_env\n"
        "print(json.dumps({'package': rsrefseg.__file__, 'demo': str(find_recipe('demo')),\n"
        "                  'sweep': str(find_recipe('ablation', kind='sweep')), 'env': runtime_env()}))",
        work, env))
    assert Path(out["package"]).is_relative_to(site)
    assert Path(out["demo"]) == site / "rsrefseg" / "configs" / "demo.yaml"
    assert Path(out["sweep"]) == site / "rsrefseg" / "configs" / "sweeps" / "ablation.yaml"
    assert "working_dir" not in out["env"]  # not the folder `rsrefseg submit` runs in
    assert out["env"]["py_modules"] == [str(site / "rsrefseg")]
    assert str(work) not in json.dumps(out["env"])


def test_the_installed_wheel_runs_the_demo_from_an_empty_folder(apart, site):
    work, env = apart
    assert Path(python("import rsrefseg; print(rsrefseg.__file__)", work, env).strip()).is_relative_to(site)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rsrefseg", *TINY_DEMO], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "Test split of the synthetic set" in done.stdout
    assert re.search(r"^\| RSRefSeg-tiny \|( [\d.]+ \|){7}$", done.stdout, re.M), done.stdout[-3000:]
    assert (work / "mlflow.db").is_file() and (work / "runs").is_dir()  # the demo's state stays in its folder
    print(f"the wheel's demo took {seconds:.0f} s")
