"""Session-wide fixtures: one local Ray for the whole run, one tiny prepared synthetic dataset.

Ray starts once (starting it costs seconds; every job test shares it). Logical CPUs exceed the
two cores on purpose: two train workers plus Ray Data's CPU tasks must fit side by side.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray Train's controller polls its workers every 2 s, so a run's end (or a killed worker) is seen
# up to 2 s late, in each of the suite's few dozen training runs: 0.5 s here (measured: ~1 s less
# a one-epoch run). Every Ray of the suite inherits this environment: the session's, the jobs
# started as subprocesses, and the clusters the tests `ray start`.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API on loopback (tests/s3.py), its admin's credentials and endpoint in this
    process's AWS variables for the whole session: Ray's processes, started after, inherit them,
    as a cluster node has its own credentials."""
    from tests.s3 import start_server

    s3 = start_server()
    patch = pytest.MonkeyPatch()
    for key, value in s3.env().items():
        patch.setenv(key, value)
    yield s3
    patch.undo()
    s3.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket of the session's S3 server (its name)."""
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    import ray
    import ray.data

    if not ray.is_initialized():
        # With the dashboard, as `rsrefseg train` runs: Ray Train's placement-group cleaner asks
        # the State API (served by the dashboard) whether the train controller is alive.
        # address="local": the tests' own Ray, even while `ray start` keeps one running here.
        ray.init(address="local", num_cpus=4, namespace="rsrefseg-tests", log_to_driver=True,
                 object_store_memory=2 * 1024**3)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from rsrefseg.datasets.synthetic import generate

    return Path(generate(tmp_path_factory.mktemp("synthetic") / "raw", size=60, seed=0))


@pytest.fixture(scope="session")
def prepared_dataset(synthetic_root, tmp_path_factory) -> Path:
    from rsrefseg.datasets.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "demo"
    prepare_dataset("synthetic", synthetic_root, out)
    return out


@pytest.fixture
def project_home(tmp_path, monkeypatch) -> Path:
    """A project folder of its own: MLflow store, run folders (RSREFSEG_HOME is the project root)."""
    monkeypatch.setenv("RSREFSEG_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model saved as a real checkpoint (weights.safetensors + config.yaml): for
    tests of the code paths that load checkpoints (predict, register), not of model quality."""
    from rsrefseg.models.checkpoint import save_checkpoint
    from rsrefseg.models.build import build_model
    from rsrefseg.platform.config import load_config

    cfg = load_config(str(REPO / "configs/demo.yaml"), [])
    out = tmp_path_factory.mktemp("ckpt") / "best"
    save_checkpoint(build_model(cfg.model, cfg.data.label_size), cfg, out)
    return out


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """The single-process gloo group a Ray Train worker would have (DeepSpeed needs one), on a
    free loopback port, with the environment DeepSpeed reads; destroyed after the block."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
