"""prepare_dataset with a Ray address: the cluster's tasks decode, the driver publishes the same
dataset as with local threads, byte for byte; a source a node cannot see fails before anything
is written; a bad sample is reported as with threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rsrefseg.datasets import cluster_pool
from rsrefseg.datasets import prepare as prepare_module
from rsrefseg.datasets.prepare import bounded_map, load_manifest, prepare_dataset
from rsrefseg.datasets.triplet import DatasetError

from .conftest import make_refsegrs
from .test_prepare import BAD_INPUTS

# Problems only the pixel pass finds (decoding), on ids that leave every split some samples.
PIXEL_CASES = ("garbage mask", "truncated image", "size mismatch", "image not 8-bit", "missing mask")


@pytest.fixture(scope="module")
def address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


def record_cluster_pools(monkeypatch) -> list[cluster_pool.ClusterPool]:
    """The pools prepare makes from now on (to see where their tasks ran); and from now on no
    local thread pool may decode: a cluster prepare that fell back to threads fails."""
    made = []

    class Recording(cluster_pool.ClusterPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def no_threads(*args, **kwargs):
        raise AssertionError("a prepare with a Ray address decoded with local threads")

    monkeypatch.setattr(cluster_pool, "ClusterPool", Recording)
    monkeypatch.setattr(prepare_module, "ThreadPoolExecutor", no_threads)
    return made


def shard_files(out: Path) -> dict[str, bytes]:
    """split/part-NNNNN.parquet (without the version) -> the shard's bytes."""
    manifest = load_manifest(out)
    return {s["path"].split("/", 1)[1]: (out / s["path"]).read_bytes() for split in manifest["shards"].values() for s in split}


def unversioned(manifest: dict) -> dict:
    """The manifest with its shard paths relative to the version (the one part that differs)."""
    shards = {split: [{**s, "path": s["path"].split("/", 1)[1]} for s in listed] for split, listed in manifest["shards"].items()}
    return {**manifest, "shards": shards}


def test_a_cluster_prepare_publishes_the_threads_dataset_byte_for_byte(address, synthetic_root, tmp_path, monkeypatch, capsys):
    from rsrefseg.cli import main

    threads = prepare_dataset("synthetic", synthetic_root, tmp_path / "threads")
    pools = record_cluster_pools(monkeypatch)
    args = ["prepare", "--format", "synthetic", "--root", str(synthetic_root), "--out", str(tmp_path / "cluster")]
    assert main([*args, "--ray-address", address]) == 0
    assert f"prepared {tmp_path / 'cluster'}: train {threads['counts']['train']}" in capsys.readouterr().out
    cluster = load_manifest(tmp_path / "cluster")
    assert cluster["content_hash"] == threads["content_hash"] and cluster["counts"] == threads["counts"]
    assert unversioned(cluster) == unversioned(threads)
    assert shard_files(tmp_path / "cluster") == shard_files(tmp_path / "threads")
    # Both passes (validation, writing) ran as tasks of several samples, in Ray's workers, not here.
    assert len(pools) == 2
    per_task = cluster_pool.ITEMS_PER_TASK
    assert [pool.tasks for pool in pools] == [-(-sum(threads["counts"].values()) // per_task),  # validating
                                              sum(-(-n // per_task) for n in threads["counts"].values())]  # per split
    assert all(pool.ran_on for pool in pools)
    assert os.getpid() not in {pid for pool in pools for _, pid in pool.ran_on}
    assert {node for pool in pools for node, _ in pool.ran_on} <= {n["NodeID"] for n in alive_nodes()}
    import ray

    assert ray.is_initialized()  # the session's Ray, which prepare found connected, stays up


def test_a_bad_sample_is_reported_as_with_threads(address, tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_refsegrs(src, repeat_mask=False)
    for case in PIXEL_CASES:
        BAD_INPUTS[case][0](src)
    with pytest.raises(DatasetError) as by_threads:
        prepare_dataset("refsegrs", src, tmp_path / "refused")
    threads = prepare_dataset("refsegrs", src, tmp_path / "threads", skip_invalid=True)
    pools = record_cluster_pools(monkeypatch)
    with pytest.raises(DatasetError) as on_cluster:
        prepare_dataset("refsegrs", src, tmp_path / "refused", ray_address=address)
    assert str(on_cluster.value) == str(by_threads.value)
    assert not (tmp_path / "refused").exists()
    cluster = prepare_dataset("refsegrs", src, tmp_path / "cluster", skip_invalid=True, ray_address=address)
    assert [s["id"] for s in cluster["skipped"]] == ["7", "8", "2", "4", "6"]  # by split, then id
    assert unversioned(cluster) == unversioned(threads)  # the skipped list, reasons and files included
    assert pools and all(pool.ran_on for pool in pools)


def test_a_source_a_node_cannot_see_fails_before_anything_is_written(address, tmp_path, monkeypatch):
    # This process is made to see the folder; the check's tasks, in Ray's workers, do not get
    # that patch: the error can only come from them.
    root, out = tmp_path / "mounted-here-only", tmp_path / "out"
    monkeypatch.setattr(cluster_pool, "_source_state", lambda path: "files 0123")
    with pytest.raises(cluster_pool.SourceNotVisible) as info:
        prepare_dataset("synthetic", root, out, ray_address=address)
    message = str(info.value)
    node = alive_nodes()[0]
    assert f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) cannot see {root}" in message
    assert "No such file or directory" in message and "nothing was written" in message
    assert not out.exists()


def test_a_node_that_sees_other_files_there_is_refused(address, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_pool, "_source_state", lambda path: "files 0123")  # here only
    with pytest.raises(cluster_pool.SourceNotVisible, match=f"sees other files at {synthetic_root} than this machine"):
        prepare_dataset("synthetic", synthetic_root, tmp_path / "out", ray_address=address)
    assert not (tmp_path / "out").exists()


def test_results_come_back_in_order_each_failure_at_its_own_sample(address, tmp_path):
    items = [str(i) for i in range(23)]
    items[9] = "not a number"
    with cluster_pool.ClusterPool(tmp_path, items_per_task=4, tasks_in_flight=2) as pool:
        assert pool.window == 8
        futures = [pool.submit(int, item) for item in items]
        with pytest.raises(ValueError, match="not a number"):  # the sample's own error, not Ray's wrapper
            futures[9].result()
        assert [f.result() for i, f in enumerate(futures) if i != 9] == [i for i in range(23) if i != 9]
        assert list(bounded_map(pool, len, items, pool.window)) == [len(i) for i in items]
    assert pool.tasks == 6 + 6


def test_a_source_gone_from_a_node_mid_run_fails_the_task_clearly(address, tmp_path):
    gone = tmp_path / "unmounted"
    with cluster_pool.ClusterPool(gone) as pool:
        future = pool.submit(len, "sample")
        with pytest.raises(cluster_pool.SourceNotVisible, match=f"cannot see the source {gone} any more"):
            future.result()


def test_the_address_is_not_in_the_resume_fingerprint(tmp_path):
    request = dict(fmt="synthetic", root=tmp_path, out=tmp_path / "out", skip_invalid=False, rows_per_shard=64,
                   max_shard_bytes=1 << 20, workers=2, mask_threshold=128, max_pixels=10**8, options={}, progress=False)
    assert (prepare_module._Request(**request, ray_address="auto").settings()
            == prepare_module._Request(**request, ray_address=None).settings())


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]
