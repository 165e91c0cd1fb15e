"""cluster.yaml is checked against Ray's own cluster-launcher schema, as `ray up` would."""

import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import fillout_defaults, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def check(config: dict) -> None:
    validate_config(fillout_defaults(copy.deepcopy(config)))


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_ray_schema(config):
    check(config)
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    gpu = [n for n in nodes.values() if n.get("resources", {}).get("GPU")]
    assert gpu and gpu[0]["max_workers"] >= 1
    assert "rayproject/ray:2.60" in config["docker"]["image"]


def test_no_credentials_and_no_public_dashboard(config):
    text = CLUSTER.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA", "password"):
        assert secret.lower() not in text.lower()
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "mlflow-server" in start


def test_jobs_resolve_relative_paths_where_the_nodes_hold_the_project(config):
    (project,) = config["file_mounts"]  # where every node holds the project, its data and weights
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert start.startswith(f"RSREFSEG_HOME={project} ray start"), start  # job drivers inherit it
    assert any(project in c and "/weights" in c for c in config["setup_commands"])


def test_runs_and_data_stay_in_object_storage(config):
    # Several nodes meet in the bucket: no node copies the datasets, and the documented job names
    # s3:// for both the shards and the run folder.
    assert not any("/data" in c for c in config["setup_commands"])
    text = CLUSTER.read_text()
    assert "data.path=s3://YOUR-BUCKET/" in text and "train.storage_path=s3://YOUR-BUCKET/" in text
    assert "--artifacts-destination s3://YOUR-BUCKET/" in " ".join(config["head_start_ray_commands"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.__setitem__("max_worker", 2),  # a typo of max_workers
        lambda c: c["available_node_types"]["head"].pop("node_config"),
        lambda c: c["available_node_types"]["gpu_8xa100"].__setitem__("min_workers", "two"),
        lambda c: c.__setitem__("file_mounts", ["not", "a", "mapping"]),
    ],
    ids=["typo-top-level", "missing-node-config", "wrong-type", "file-mounts-list"],
)
def test_broken_copy_fails_schema(config, mutate):
    mutate(config)
    with pytest.raises(ValidationError):
        check(config)
