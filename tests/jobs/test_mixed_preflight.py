"""A mixture's sources are checked before Ray: every split the run reads, in every source, and
the epoch's rows (the budgets) give the step count."""

import json
from pathlib import Path

import pytest

from rsrefseg.inference.streams import train_budgets
from rsrefseg.jobs import train
from rsrefseg.platform.config import load_config
from rsrefseg.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def mixed(prepared: Path, *overrides: str):
    return load_config(REPO / "configs/demo-mixed.yaml", [
        f"data.sources.synth_a.path={prepared}", f"data.sources.synth_b.path={prepared}", *overrides])


def test_a_split_missing_from_a_source_names_the_source_and_its_path(prepared_dataset):
    with pytest.raises(ConfigError) as err:
        train.preflight(mixed(prepared_dataset, "data.val_split=testA"))
    message = str(err.value)
    assert message.startswith("data.val_split: split 'testA'")
    assert "source 'synth_a' (data.sources.synth_a.path)" in message and str(prepared_dataset) in message


def test_a_missing_source_folder_names_its_key(prepared_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.sources.synth_b.path: .*does not exist"):
        train.preflight(mixed(prepared_dataset, f"data.sources.synth_b.path={tmp_path / 'nowhere'}"))


def test_steps_per_epoch_follow_the_budgets(prepared_dataset):
    cfg = mixed(prepared_dataset, "data.sources.synth_b.weight=3", "train.batch_size=4")
    train.preflight(cfg)
    rows = 2 * int(json.loads((prepared_dataset / "manifest.json").read_text())["counts"]["train"])
    budgets = {"synth_a": round(rows / 4), "synth_b": round(rows * 3 / 4)}
    assert train_budgets(cfg) == budgets
    assert train.epoch_rows(cfg) == sum(budgets.values())
    assert train.steps_per_epoch(cfg, train.epoch_rows(cfg)) == sum(budgets.values()) // 2 // 2
