"""What `rsrefseg evaluate` prints and plans, without a trained model."""

from __future__ import annotations

import pytest

from rsrefseg.jobs.evaluate import format_row, format_table, plan_replicas, replica_cpus, summarize
from rsrefseg.platform.config import Config


def test_tables_name_both_conventions_and_counts():
    m = {"Pr@0.5": 50.0, "Pr@0.6": 40.0, "Pr@0.7": 30.0, "Pr@0.8": 20.0, "Pr@0.9": 10.0, "cIoU": 61.234, "gIoU": 55.5, "count": 4}
    row = format_row(m, label="demo/test")
    assert "| cIoU (=oIoU) | gIoU (=mIoU) |" in row and "| demo/test | 50.00 |" in row and "61.23" in row
    table = format_table({"vehicle": m, "road": {**m, "count": 2}}, first="category").splitlines()
    assert table[0].startswith("| category |") and table[0].endswith("| n |")
    assert table[2].startswith("| vehicle |") and table[2].endswith("| 4 |") and table[3].endswith("| 2 |")


def test_summarize_breaks_down_by_category_and_size_from_records():
    rows = {"id": ["1", "2", "3"], "category": ["road", "car", "car"], "size": [">=20%", "<1%", "<1%"],
            "intersection": [30, 1, 0], "union": [40, 2, 3], "iou": [0.75, 0.5, 0.0]}
    result = summarize(rows, split="test")
    assert result["metrics"]["cIoU"] == pytest.approx(100 * 31 / 45)
    assert result["metrics"]["gIoU"] == pytest.approx(100 * 1.25 / 3)
    assert list(result["by_size"]) == ["<1%", ">=20%"]  # the buckets' order, not the count's
    assert result["by_category"]["car"]["count"] == 2 and result["by_category"]["car"]["gIoU"] == pytest.approx(25.0)


def test_cpu_cluster_gets_one_replica_with_the_cpus_ingest_leaves(ray_session):
    import ray

    cfg = Config().validate()
    replicas = plan_replicas(cfg, batch_size=4)
    assert replicas.gpus == 0 and replicas.count == 1
    assert replicas.cpus == ray.cluster_resources()["CPU"] - cfg.train.ingest_cpus
    assert plan_replicas(cfg, batch_size=4, count=2).cpus == (ray.cluster_resources()["CPU"] - cfg.train.ingest_cpus) // 2


def test_a_cpu_replica_never_asks_for_more_than_one_node_has():
    # One node of 3: ingest keeps one, the replica takes two.
    assert replica_cpus(3, 3, ingest=1, count=1) == 2
    # Two nodes of 3: five are free of ingest, but an actor lives on one node: three, and ingest
    # runs on the other node.
    assert replica_cpus(6, 3, ingest=1, count=1) == 3
    assert replica_cpus(6, 3, ingest=1, count=2) == 2
    # An autoscaling cluster with no node up yet: its configured maximum, unbounded by a node.
    assert replica_cpus(16, 0, ingest=1, count=1) == 15
    assert replica_cpus(1, 1, ingest=1, count=1) == 1
