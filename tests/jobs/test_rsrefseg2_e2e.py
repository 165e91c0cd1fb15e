"""RSRefSeg-2 through the same commands as RSRefSeg: train (2 Ray workers, DeepSpeed ZeRO-2 on
CPU), evaluate with its breakdowns, predict a GeoTIFF scene, register the MLflow model, at the
tiny size of its own classes (SAM 2.1, SigLIP, the cascaded prompter)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsrefseg.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(ray_session, prepared_dataset, tmp_path_factory):
    home = tmp_path_factory.mktemp("rsrefseg2-home")
    args = ["train", "--config", "demo-rsrefseg2", f"data.path={prepared_dataset}", "train.epochs=1",
            "train.batch_size=4", "train.log_every_n_steps=2", "train.figure_samples=0",
            f"tracking.uri=sqlite:///{home / 'mlflow.db'}", "tracking.experiment=e2e2", "tracking.run_name=e2e2",
            f"train.storage_path={home / 'runs'}", "tracking.system_metrics_s=0", "train.register_as=e2e2-model"]
    assert main(args) == 0
    (run_dir,) = [p for p in (home / "runs").iterdir() if p.name.startswith("e2e2-")]
    return home, run_dir


def test_training_logs_each_loss_term_and_records_the_architecture(trained):
    from mlflow.tracking import MlflowClient

    home, run_dir = trained
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e2")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`rsrefseg.job` = 'train'")
    assert run.info.status == "FINISHED"
    for term in ("bce", "dice", "decorrelation", "contrastive"):
        assert f"train/loss_{term}" in run.data.metrics, term
    assert "val/gIoU" in run.data.metrics
    params = run.data.params
    assert params["model.arch"] == "rsrefseg2" and params["model.rsrefseg2.contrastive_weight"] == "0.5"
    assert params["model.dice_weight"] == "5.0" and params["train.cosine_start"] == "0.0"
    config = (run_dir / "best" / "config.yaml").read_text()
    assert "arch: rsrefseg2" in config
    # register_as: the best checkpoint became a registered MLflow model of this architecture.
    (version,) = client.search_model_versions("name='e2e2-model'")
    assert client.get_run(version.run_id).data.tags["rsrefseg.source_run"] == run.info.run_id


def test_evaluate_gives_the_breakdowns(trained, prepared_dataset):
    home, run_dir = trained
    out = home / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--split", "test", "--out", str(out),
                 "tracking.enabled=false"]) == 0
    result = json.loads(out.read_text())
    manifest = json.loads((prepared_dataset / "manifest.json").read_text())
    assert result["metrics"]["count"] == manifest["counts"]["test"]
    assert set(result["by_category"]) == set(manifest["categories"]["test"])
    assert sum(v["count"] for v in result["by_size"].values()) == result["metrics"]["count"]


def test_predict_segments_a_wide_geotiff_scene_tile_by_tile(trained, tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    _, run_dir = trained
    scene, out = tmp_path / "scene.tif", tmp_path / "mask.tif"
    bands = np.random.default_rng(0).integers(0, 255, (3, 300, 700)).astype(np.uint8)
    transform = from_origin(500000.0, 5200000.0, 0.5, 0.5)
    with rasterio.open(scene, "w", driver="GTiff", height=300, width=700, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as dst:
        dst.write(bands)
    # Tiles of 256 px: the last column of tiles is narrower, letterboxed on the way in.
    assert main(["predict", "--checkpoint", str(run_dir / "best"), "--image", str(scene), "--text", "vehicle",
                 "--out", str(out), "--tile", "256"]) == 0
    with rasterio.open(out) as mask:
        assert (mask.height, mask.width) == (300, 700) and mask.transform == transform
        assert set(np.unique(mask.read(1))) <= {0, 255}
