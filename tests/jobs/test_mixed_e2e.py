"""A mixed run end to end, through the CLI: two prepared datasets in different encodings (the
synthetic set stored raw, an RRSIS-D-layout set with its JPEGs kept as shipped) train one tiny
model; validation, MLflow and evaluate report each source and the mixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsrefseg.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory) -> Path:
    from rsrefseg.datasets.prepare import prepare_dataset
    from tests.datasets.conftest import make_rrsisd

    root = tmp_path_factory.mktemp("rrsisd-mixed")
    make_rrsisd(root)
    return Path(prepare_dataset("rrsisd", root, root / "prepared") and root / "prepared")


@pytest.fixture(scope="module")
def mixed_run(ray_session, prepared_dataset, jpeg_dataset, tmp_path_factory):
    home = tmp_path_factory.mktemp("mixed-home")
    sources = f"{{synthetic: {{path: {prepared_dataset}}}, rrsisd: {{path: {jpeg_dataset}, weight: 1}}}}"
    tracking = [f"tracking.uri=sqlite:///{home / 'mlflow.db'}", "tracking.experiment=mixed"]
    assert main(["train", "--config", str(REPO / "configs/demo-mixed.yaml"), f"data.sources={sources}",
                 "train.epochs=1", "train.batch_size=4", "train.figure_samples=0", "tracking.system_metrics_s=0",
                 f"train.storage_path={home / 'runs'}", *tracking]) == 0
    (run_dir,) = [p for p in (home / "runs").iterdir() if p.is_dir()]
    return home, run_dir, tracking


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def runs_of(home: Path, job: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mixed")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`rsrefseg.job` = '{job}'")
    return client, run


def test_a_mixed_run_validates_per_source_and_lists_every_source(mixed_run, prepared_dataset, jpeg_dataset):
    home, _, _ = mixed_run
    client, run = runs_of(home, "train")
    synthetic, rrsisd = manifest(prepared_dataset), manifest(jpeg_dataset)
    metrics = run.data.metrics
    assert metrics["val/synthetic/count"] == synthetic["counts"]["val"]
    assert metrics["val/rrsisd/count"] == rrsisd["counts"]["val"]
    assert metrics["val/count"] == synthetic["counts"]["val"] + rrsisd["counts"]["val"]  # the mixture
    assert {"val/synthetic/gIoU", "val/rrsisd/gIoU", "val/gIoU", "best/rrsisd/gIoU"} <= set(metrics)
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    listed = {({t.key: t.value for t in i.tags}["rsrefseg.source"], {t.key: t.value for t in i.tags}["mlflow.data.context"]):
              i.dataset.digest for i in inputs}
    assert listed == {("synthetic", "train"): synthetic["content_hash"][:32],
                      ("synthetic", "validation"): synthetic["content_hash"][:32],
                      ("rrsisd", "train"): rrsisd["content_hash"][:32],
                      ("rrsisd", "validation"): rrsisd["content_hash"][:32]}
    assert run.data.tags["rsrefseg.dataset_hash"] == (f"synthetic={synthetic['content_hash']},"
                                                      f"rrsisd={rrsisd['content_hash']}")


def test_evaluate_reports_each_source_with_its_own_categories(mixed_run, prepared_dataset, jpeg_dataset, capsys):
    home, run_dir, tracking = mixed_run
    out = home / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--split", "test", "--out", str(out), *tracking]) == 0
    printed = capsys.readouterr().out
    assert "by source (test" in printed and "by category (synthetic/test)" in printed
    assert "by category (rrsisd/test)" in printed
    result = json.loads(out.read_text())
    synthetic, rrsisd = manifest(prepared_dataset), manifest(jpeg_dataset)
    assert {k: v["count"] for k, v in result["by_source"].items()} == {
        "synthetic": synthetic["counts"]["test"], "rrsisd": rrsisd["counts"]["test"]}
    expected = {**{f"synthetic/{c}": n for c, n in synthetic["categories"]["test"].items()},
                **{f"rrsisd/{c}": n for c, n in rrsisd["categories"]["test"].items()}}
    assert {k: v["count"] for k, v in result["by_category"].items()} == expected
    client, ev = runs_of(home, "evaluate")
    assert ev.data.metrics["test/rrsisd/gIoU"] == pytest.approx(result["by_source"]["rrsisd"]["gIoU"])
    assert len(client.get_run(ev.info.run_id).inputs.dataset_inputs) == 2
