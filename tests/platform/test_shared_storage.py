"""A multi-node run whose storage folder is not shared fails before training, naming the nodes
and what to set. The two-node cluster test (tests/jobs/test_cluster_submit.py) runs the passing
path on a real cluster; here the nodes are the session's one-node Ray, told it has company."""

from __future__ import annotations

import pytest

from rsrefseg.platform import shared_storage
from rsrefseg.platform.shared_storage import StorageNotShared, check_shared_storage


def _two_nodes(ray, monkeypatch):
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    other = {**node, "NodeID": "f" * 56, "NodeManagerAddress": "10.0.0.9"}
    monkeypatch.setattr(ray, "nodes", lambda: [node, other])
    return node["NodeID"], other["NodeID"]


def test_a_folder_every_node_sees_passes_and_leaves_nothing(ray_session, tmp_path, monkeypatch):
    here, other = _two_nodes(ray_session, monkeypatch)
    real = shared_storage.sees_marker
    # The real task runs on the node that exists; the made-up node answers as that one did.
    monkeypatch.setattr(shared_storage, "sees_marker",
                        lambda nodes, marker, token: {n: real({here: nodes[here]}, marker, token)[here] for n in nodes})
    check_shared_storage(str(tmp_path / "runs"))
    assert list((tmp_path / "runs").iterdir()) == []  # the marker is gone


def test_a_node_that_cannot_see_the_folder_fails_the_run_before_training(ray_session, tmp_path, monkeypatch):
    here, other = _two_nodes(ray_session, monkeypatch)
    real = shared_storage.sees_marker
    monkeypatch.setattr(shared_storage, "sees_marker",
                        lambda nodes, marker, token: {here: real({here: nodes[here]}, marker, token)[here], other: False})
    with pytest.raises(StorageNotShared, match=r"train\.storage_path: .* 10\.0\.0\.9 .*s3://"):
        check_shared_storage(str(tmp_path / "runs"))
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_cloud_uri_and_a_single_node_are_not_probed(ray_session, monkeypatch):
    monkeypatch.setattr(shared_storage, "sees_marker", lambda *a: pytest.fail("probed"))
    check_shared_storage("s3://bucket/runs")
    check_shared_storage("/nonexistent-single-node-is-fine")  # one node: nothing to share
