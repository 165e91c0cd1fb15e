"""cluster.yaml is checked against Ray's own cluster-launcher schema, as `ray up` would."""

import copy
import re
import shlex
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
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA"):
        assert secret.lower() not in text.lower()
    # A password is only ever named, as a variable of the nodes' environment: never a value.
    for line in text.splitlines():
        for value in re.findall(r"(?i)password\s*[=:]\s*(\S*)", line):
            assert value in ("'...'", '"$MLFLOW_TRACKING_PASSWORD"'), line
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "mlflow-server" in start


def _mlflow_server(config) -> str:
    (command,) = [c for c in config["head_start_ray_commands"] if "rsrefseg mlflow-server" in c]
    return command


def test_the_mlflow_server_requires_a_password_and_listens_on_the_private_address_only(config):
    command = _mlflow_server(config)
    args = shlex.split(command.split("rsrefseg mlflow-server", 1)[1].split(">", 1)[0])
    assert "--auth" in args
    host = args[args.index("--host") + 1]
    assert host not in ("0.0.0.0", "::", "") and "0.0.0.0" not in command
    assert "hostname -I" in host  # the head's private address
    # The admin's credentials come from the environment (the secret every node copies), never the
    # command line: only variables precede `nohup`.
    admin = command.split("nohup", 1)[0]
    assert 'MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME"' in admin
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in admin
    assert "PASSWORD" not in command.split("nohup", 1)[1]


def test_every_node_starts_ray_with_the_mlflow_credentials_jobs_sign_in_with(config):
    setup = " ".join(config["setup_commands"])
    assert "secretsmanager get-secret-value" in setup and "umask 077" in setup and "~/.rsrefseg/mlflow.env" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        # Job drivers and train workers inherit Ray's environment: they find the credentials there.
        assert start.startswith("set -a && . ~/.rsrefseg/mlflow.env && set +a && "), start
    assert _mlflow_server(config).startswith("set -a && . ~/.rsrefseg/mlflow.env && set +a")


def test_jobs_resolve_relative_paths_where_the_nodes_hold_the_project(config):
    (project,) = config["file_mounts"]  # where every node holds the project, its data and weights
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert f" && RSREFSEG_HOME={project} ray start" in start, start  # job drivers inherit it
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
