"""The Ray internals `platform.ray_compat` reads, checked against the installed Ray.

At run time ray_compat guards each internal (with a Ray that lacks one, a job only loses the
feature built on it, silently), so it is here that a Ray upgrade which removes or renames one
must fail, naming the internal: then adapt ray_compat (or use the public API that replaced it).
"""

from __future__ import annotations

import inspect
import json

import pytest

from rsrefseg.platform import ray_compat


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# -- the internals exist, with the signatures ray_compat calls them with -----------------------------


def test_the_local_ray_lookup_internals_exist():
    from ray._private import services

    assert _parameters(services.canonicalize_bootstrap_address)[:2] == ["addr", "temp_dir"], \
        "ray._private.services.canonicalize_bootstrap_address(addr, temp_dir) changed"
    assert _parameters(services.find_gcs_addresses) == [], "ray._private.services.find_gcs_addresses() changed"
    assert callable(getattr(services.find_gcs_addresses, "cache_clear", None)), \
        "ray._private.services.find_gcs_addresses is no longer a cache that can be cleared"


def test_the_job_config_variable_is_the_one_ray_writes_and_reads():
    from ray._private import worker
    from ray._private.runtime_env import constants
    from ray.dashboard.modules.job import job_supervisor

    # Written by the job supervisor for a submitted job's driver, read by ray.init in it.
    for module in (constants, job_supervisor, worker):
        assert getattr(module, "RAY_JOB_CONFIG_JSON_ENV_VAR", None) == ray_compat.JOB_CONFIG_ENV, \
            f"{module.__name__}.RAY_JOB_CONFIG_JSON_ENV_VAR changed or is gone"


def test_the_autoscaler_max_internal_exists():
    from ray._private import state

    assert isinstance(state.state, state.GlobalState), "ray._private.state.state is gone"
    assert _parameters(state.state.get_max_resources_from_cluster_config) == [], \
        "ray._private.state.GlobalState.get_max_resources_from_cluster_config() changed"


# -- the adapters give what their callers expect --------------------------------------------------------


def test_job_env_vars_reads_the_job_config_ray_init_applies():
    from ray.job_config import JobConfig

    env_vars = {"AWS_ENDPOINT_URL": "http://10.0.0.5:9000", "AWS_REGION": "us-east-1"}
    # What the job supervisor writes: the driver's runtime env and the job's metadata.
    written = json.dumps({"runtime_env": {"env_vars": env_vars}, "metadata": {"job_name": "x"}})
    assert JobConfig.from_json(json.loads(written)).runtime_env["env_vars"] == env_vars  # ray.init's reading
    assert ray_compat.job_env_vars({ray_compat.JOB_CONFIG_ENV: written}) == env_vars


@pytest.mark.parametrize("environ", [
    {},  # not a Ray job
    {ray_compat.JOB_CONFIG_ENV: "not json"},
    {ray_compat.JOB_CONFIG_ENV: json.dumps({"runtime_env": None, "metadata": {}})},
    {ray_compat.JOB_CONFIG_ENV: json.dumps(["a list"])},
])
def test_job_env_vars_is_empty_outside_a_job_or_for_a_config_it_cannot_read(environ):
    assert ray_compat.job_env_vars(environ) == {}


def test_a_ray_start_record_counts_only_while_its_ray_runs(ray_session, tmp_path, monkeypatch):
    from ray._private import services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    services.find_gcs_addresses.cache_clear()  # found before the session's Ray started: look again
    gcs = ray_session.get_runtime_context().gcs_address
    record = tmp_path / "ray_current_cluster"  # what `ray start` writes in Ray's temp dir

    assert ray_compat.started_ray_address(str(tmp_path)) is None  # no record
    record.write_text(gcs)
    assert ray_compat.started_ray_address(str(tmp_path)) == gcs
    record.write_text(f"{gcs.rsplit(':', 1)[0]}:1")  # a Ray killed without `ray stop`
    assert ray_compat.started_ray_address(str(tmp_path)) is None


def test_the_autoscaler_max_comes_from_the_cluster_config_an_autoscaler_publishes(ray_session):
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from rsrefseg.platform.capacity import cluster_cpus

    assert ray_compat.autoscaler_max_resources() == {}  # a local Ray has no autoscaler
    now = float(ray_session.cluster_resources()["CPU"])
    assert cluster_cpus() == now

    # As cluster.yaml's autoscaler does: worker nodes of 8 CPUs, at most 3 of them.
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="workers", max_count=3)
    group.resources["CPU"] = 8
    key, namespace = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        assert ray_compat.autoscaler_max_resources() == {"CPU": 24.0}
        assert cluster_cpus() == max(now, 24.0)
    finally:
        _internal_kv_del(key, namespace=namespace)
    assert ray_compat.autoscaler_max_resources() == {}


def test_the_worker_log_printer_exists_and_filters(monkeypatch):
    import io

    from ray._private import worker

    assert _parameters(worker.print_worker_logs)[:2] == ["data", "print_file"], (
        "ray._private.worker.print_worker_logs(data, print_file, ...) changed")
    printed = []
    monkeypatch.setattr(worker, "print_worker_logs",
                        lambda data, print_file, ignore_prefix=False: printed.append(list(data["lines"])))
    assert ray_compat.filter_worker_logs(lambda data: [l for l in data["lines"] if l.startswith("[rsrefseg]")])
    worker.print_worker_logs({"lines": ["Reporting training result", "[rsrefseg] epoch 1"], "pid": 1}, io.StringIO())
    worker.print_worker_logs({"lines": ["noise only"], "pid": 1}, io.StringIO())
    assert printed == [["[rsrefseg] epoch 1"]]  # a batch with nothing to show is not printed at all
