"""A local command while `ray start` keeps a Ray running on this machine: the job joins that Ray,
says so, and sizes itself by that Ray's CPUs, instead of dying inside `ray.init` (which refuses
num_cpus when it joins a running Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.network import free_port, kill_tree_using

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_head_env():
    """A 2-CPU `ray start --head`, and the environment of a shell on the same machine.

    Ray records the last `ray start` under its temp dir (RAY_TMPDIR/ray), where `ray.init()` finds
    it; a private temp dir keeps this head out of sight of the other tests' Rays and theirs out of
    this one's, and lets teardown stop exactly its processes."""
    ray_tmp = Path(f"/tmp/rsr-head-{os.getpid()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    ports = [f"--port={free_port()}", f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--metrics-export-port={free_port()}"]
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2", "--disable-usage-stats",
                        f"--temp-dir={ray_tmp / 'ray'}", *ports], check=True, env=env, capture_output=True)
        yield env
    finally:
        kill_tree_using(str(ray_tmp))
        subprocess.run(["rm", "-rf", str(ray_tmp)])


@pytest.mark.timeout(600)
def test_train_joins_the_running_local_ray_and_fits_its_cpus(local_head_env, prepared_dataset, tmp_path):
    env = {**local_head_env, "RSREFSEG_HOME": str(tmp_path)}
    train = [str(BIN / "rsrefseg"), "train", "--config", str(REPO / "configs/demo.yaml"), f"data.path={prepared_dataset}",
             "train.epochs=1", "train.batch_size=4", "data.limit=16", "train.figure_samples=0"]

    # demo.yaml would start a 4-CPU Ray (cluster.num_cpus); the running one has 2, which its two
    # 1-CPU workers would fill, leaving Ray Data none: a clear refusal, no traceback.
    refused = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "joining the Ray already running on this machine" in refused.stderr
    assert "of the 2 CPUs of the Ray already running on this machine" in refused.stderr
    assert "Traceback" not in refused.stderr

    fits = subprocess.run([*train, "train.cpus_per_worker=0.5"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=500)
    assert fits.returncode == 0, fits.stderr[-3000:]
    assert "joining the Ray already running on this machine" in fits.stderr
    assert "[rsrefseg] best checkpoint (epoch 1" in fits.stdout
