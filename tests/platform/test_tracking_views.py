"""What a researcher sees in MLflow: the experiment's view and each run's dataset (real SQLite store)."""

from __future__ import annotations

import json

from rsrefseg.platform import tracking
from rsrefseg.platform.config import load_config


def _cfg(tmp_path, experiment="views"):
    return load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.experiment={experiment}",
                              f"tracking.artifact_location={tmp_path / 'artifacts'}"])


def test_experiments_open_in_the_model_training_view_unless_someone_chose_otherwise(tmp_path):
    cfg = _cfg(tmp_path)
    c = tracking.client(cfg.tracking)
    exp_id = tracking.experiment_id(cfg.tracking)
    assert c.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    older = c.create_experiment("older")  # made before the platform set kinds: gets one
    tracking.experiment_id(cfg.tracking, "older")
    assert c.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = c.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    tracking.experiment_id(cfg.tracking, "chosen")
    assert c.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_a_run_records_the_prepared_dataset_as_its_input(tmp_path):
    cfg = _cfg(tmp_path)
    run_id = tracking.create_run(cfg, run_name="r")
    manifest = {"format": "rrsisd", "content_hash": "ab" * 32, "columns": ["id", "phrase"],
                "counts": {"train": 3, "val": 1}, "categories": {"train": {"vehicle": 3}}}
    c = tracking.client(cfg.tracking)
    tracking.log_dataset(c, run_id, manifest, "/data/rrsisd/prepared", {"train": "train", "validation": "val"})
    inputs = c.get_run(run_id).inputs.dataset_inputs
    by_context = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i for i in inputs}
    assert set(by_context) == {"train", "validation"}
    dataset = by_context["train"].dataset
    assert dataset.name == "rrsisd:prepared/train" and dataset.digest == "ab" * 16
    assert json.loads(dataset.source) == {"uri": "/data/rrsisd/prepared", "split": "train"} and dataset.source_type == "local"
    assert json.loads(dataset.profile) == {"samples": 3, "categories": {"vehicle": 3}}
    assert {t.key: t.value for t in by_context["validation"].tags}["rsrefseg.split"] == "val"
