"""A real two-node Ray cluster on this machine, an MLflow server on loopback, object storage (an
S3 bucket of the tests' moto server, tests/s3.py), and jobs submitted through `rsrefseg submit`
(the Ray Jobs API). Everything is torn down at the end.

As on a real cluster, every node has the store's endpoint and credentials in its environment
(the AWS variables `ray start` ran with), and the MLflow server on the head keeps its artifacts in
the bucket.

The cluster lives in its own Ray temp dir, so teardown stops exactly its processes and leaves
the test session's own local Ray alone (`ray stop` would kill every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rsrefseg.cli import main
from tests.network import free_port, kill_tree_using, train_worker_pids, wait_http

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    tmp = tmp_path_factory.mktemp("raycluster")
    bucket = s3_server.new_bucket()
    # Ray's socket paths must stay short: a temp dir of its own under /tmp.
    ray_tmp = Path(f"/tmp/rsr-{os.getpid()}")
    gcs, dash, mlflow_port = free_port(), free_port(), free_port()
    # Token authentication on, as Ray 2.60 starts a head on a user's machine: a first local
    # `ray.init()` (any local `rsrefseg train`) leaves a token in ~/.ray/auth_token, and
    # `ray start --head` with RAY_AUTH_MODE unset turns token auth on when it finds one. A joining
    # node is told to use it (RAY_AUTH_MODE=token), as Ray's docs say. The home folder is the
    # test's own (the machine's token is left alone); the test process reads it from there too.
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                          "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(home)
    # Only the token moves: the nodes keep the machine's caches (DeepSpeed's compiled CPU op among
    # them), as a real node keeps its own between jobs.
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, env=env, capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    # Job entrypoints run `python` from the node's PATH, as on a real node with an activated env.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # The project folder on the nodes, as cluster.yaml starts Ray: jobs resolve relative paths there.
    project = tmp / "project"
    env["RSREFSEG_HOME"] = str(project)
    # Each node a temp dir of its own, as on separate machines: nodes sharing one share
    # runtime_resources/, and a node's runtime-env agent unpacking the job's working_dir again
    # there deletes the folder the job's driver runs in on the other node.
    common = ["--disable-usage-stats"]

    def node_ports() -> list[str]:
        # Two nodes on one machine: each node's agents need ports of their own (the defaults clash).
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    procs = []
    try:
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=3", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--node-ip-address=127.0.0.1", *node_ports(),
             *common, f"--temp-dir={ray_tmp / 'head'}"],
            check=True, env=env, capture_output=True,
        )
        subprocess.run(
            [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=3",
             "--node-ip-address=127.0.0.1", *node_ports(), *common, f"--temp-dir={ray_tmp / 'node'}"],
            check=True, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
        )
        store = tmp / "mlflow"
        store.mkdir()
        procs.append(subprocess.Popen(
            [str(BIN / "rsrefseg"), "mlflow-server", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{bucket}/mlartifacts",
             "--workers", "1"],
            stdout=open(tmp / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        ))
        wait_http(f"http://127.0.0.1:{mlflow_port}/health")
        token = (home / ".ray" / "auth_token").read_text().strip()
        wait_http(f"http://127.0.0.1:{dash}/api/version", headers={"Authorization": f"Bearer {token}"})
        # The head does want the token: a request without it is refused.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)
        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setenv("HOME", str(home))  # `rsrefseg submit` and `jobs` find ~/.ray/auth_token there
        for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.delenv(key, raising=False)
        procs.append(monkeypatch)
        yield {"address": f"http://127.0.0.1:{dash}", "mlflow": f"http://127.0.0.1:{mlflow_port}", "tmp": tmp,
               "project": project, "bucket": bucket}
    finally:
        for p in procs:
            if isinstance(p, pytest.MonkeyPatch):
                p.undo()
            else:
                os.killpg(p.pid, signal.SIGKILL)
        kill_tree_using(str(ray_tmp))
        subprocess.run(["rm", "-rf", str(ray_tmp)])


def _submit(cluster, *job: str) -> int:
    return main(["submit", "--address", cluster["address"], "--", *job])


def test_a_job_with_only_s3_paths_trains_on_both_nodes_survives_a_killed_worker_and_evaluates(
        cluster, s3_server, synthetic_root, prepared_dataset, capsys):
    # The README's cluster commands with only s3:// paths: the dataset prepared into the bucket
    # from here, the run folder in the bucket, MLflow's artifacts in the bucket behind the server.
    from mlflow.tracking import MlflowClient

    from rsrefseg.jobs.submit import _client

    bucket = cluster["bucket"]
    data, runs_uri = f"s3://{bucket}/data/demo/prepared", f"s3://{bucket}/runs"
    assert main(["prepare", "--format", "synthetic", "--root", str(synthetic_root), "--out", data]) == 0
    capsys.readouterr()
    job = ["train", "--config", "configs/demo.yaml", f"data.path={data}", f"train.storage_path={runs_uri}",
           "train.epochs=2", "train.batch_size=4", "data.limit=16", "train.max_failures=1",
           # 2 CPUs a worker on 3-CPU nodes: the two workers cannot share a node.
           "train.cpus_per_worker=2",
           f"tracking.uri={cluster['mlflow']}", "tracking.experiment=cluster", "tracking.run_name=cluster"]
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", _submit(cluster, *job)))
    thread.start()
    killed, deadline = 0, time.time() + 600
    while thread.is_alive() and not killed and time.time() < deadline:
        # Once epoch 1's checkpoint is in the bucket, a worker dies: the group restarts from it.
        pids = train_worker_pids() if s3_server.checkpointed_epochs(bucket) else []
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed = 1
        time.sleep(0.2)
    thread.join(timeout=900)
    out = capsys.readouterr().out
    assert killed, "the job ended before a worker could be killed"
    assert result.get("rc") == 0, out[-3000:]
    assert "SUCCEEDED" in out
    jobs = _client(cluster["address"]).list_jobs()  # authenticated as `rsrefseg jobs` is
    assert any(j.status.value == "SUCCEEDED" for j in jobs)

    client = MlflowClient(tracking_uri=cluster["mlflow"])
    exp = client.get_experiment_by_name("cluster")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`rsrefseg.job` = 'train'")
    assert run.info.status == "FINISHED"
    # Epoch 1 came back from the bucket's checkpoint after the kill: validated once, not retrained.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/gIoU")) == [1, 2]
    nodes = run.data.tags["rsrefseg.worker_nodes"].split(",")
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    # The dataset in the bucket is the same dataset as a local prepare of the same scenes.
    manifest = json.loads((prepared_dataset / "manifest.json").read_text())
    assert run.data.tags["rsrefseg.dataset_hash"] == manifest["content_hash"]
    # The run's folder and its artifacts are objects in the bucket; the server lists them.
    (name,) = {k.split("/")[1] for k in s3_server.keys(bucket, "runs/") if k.endswith("/rsrefseg_run.json")}
    assert f"runs/{name}/best/weights.safetensors" in s3_server.keys(bucket, f"runs/{name}/best/")
    artifacts = s3_server.keys(bucket, "mlartifacts/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/checkpoints/best/weights.safetensors") for k in artifacts)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/val_predictions/epoch_002.png") for k in artifacts)
    assert "checkpoints/best" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert not (cluster["project"] / "runs").exists()  # no node kept the run on its disk

    # Evaluate reads the best checkpoint from the bucket, on the cluster.
    assert _submit(cluster, "evaluate", "--checkpoint", f"{runs_uri}/{name}", "--split", "test",
                   f"tracking.uri={cluster['mlflow']}", "tracking.experiment=cluster") == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    (evaluation,) = client.search_runs([exp.experiment_id], filter_string="tags.`rsrefseg.job` = 'evaluate'")
    assert evaluation.data.tags["rsrefseg.checkpoint"] == f"{runs_uri}/{name}"
    assert evaluation.data.metrics["test/count"] == min(manifest["counts"]["test"], 16)  # the run's data.limit
    assert [k for k in s3_server.keys(bucket, "mlartifacts/") if evaluation.info.run_id in k]


def test_bad_config_job_fails_fast_with_the_error_in_its_logs(cluster, capsys):
    started = time.time()
    rc = main(["submit", "--address", cluster["address"], "--",
               "train", "--config", "configs/demo.yaml", "model.prompter.downsample_rate=3"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "model.prompter.downsample_rate" in out and "FAILED" in out
    assert time.time() - started < 120

    # The printed job id works with every `rsrefseg jobs` action.
    job_id = re.search(r"\[rsrefseg\] submitted (\S+):", out).group(1)
    jobs = ["jobs", "--address", cluster["address"]]
    assert main([*jobs, "list"]) == 0
    assert f"{job_id}\tFAILED" in capsys.readouterr().out
    assert main([*jobs, "status", job_id]) == 0
    assert capsys.readouterr().out.strip() == "FAILED"
    assert main([*jobs, "logs", job_id]) == 1  # the job's exit status, as submit gives it
    assert "model.prompter.downsample_rate" in capsys.readouterr().out
    assert main([*jobs, "stop", job_id]) == 0
    assert "not running" in capsys.readouterr().out


def test_missing_data_path_names_the_cluster_host(cluster, capsys):
    rc = main(["submit", "--address", cluster["address"], "--",
               "train", "--config", "configs/demo.yaml", "data.path=/nonexistent/prepared"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "/nonexistent/prepared" in out and "cluster host" in out
