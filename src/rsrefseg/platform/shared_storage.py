"""On a cluster of several nodes, `train.storage_path` must be one storage that every node sees.

Ray Train's workers write their checkpoint shards there and the driver reads the run back from
it (best checkpoint, resume, Tune's experiment state); a local folder that exists on every node
but is not the same folder makes a run that trains for hours and then cannot find its own
checkpoints. So before any training: the driver writes a marker file into the storage folder and
a zero-CPU task on every alive node looks for it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.paths import is_uri
from rsrefseg.platform.storage import probe_file


class StorageNotShared(ConfigError):
    """train.storage_path is a local folder that some node of the cluster does not share."""


def check_shared_storage(storage_path: str) -> None:
    """Fail, naming the nodes that cannot see it and what to set, when a local storage folder is
    not shared by every alive node of a multi-node cluster. A URI (s3://, gs://, ...) passes:
    every node reaches it through the same filesystem client."""
    import ray

    if is_uri(storage_path):
        return
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    if len(nodes) < 2:
        return
    folder = Path(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    with probe_file(folder, token) as marker:
        seen = sees_marker(nodes, str(marker), token)
    blind = sorted(f"{nodes[node]} ({node[:8]})" for node, ok in seen.items() if not ok)
    if blind:
        raise StorageNotShared(
            f"train.storage_path: {folder} is not shared by the cluster's nodes: {', '.join(blind)} cannot see "
            f"the file the driver wrote there. Ray Train's workers and driver meet in this folder (checkpoints, "
            "resume), so on a multi-node cluster set train.storage_path to storage every node mounts at the "
            "same path (NFS, a shared volume) or to a cloud URI (s3://BUCKET/runs, gs://BUCKET/runs)"
        )


def sees_marker(nodes: dict[str, str], marker: str, token: str) -> dict[str, bool]:
    """Node id -> whether a task pinned to that node reads `token` from the file `marker`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    refs = {node: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(marker)
            for node in nodes}
    return {node: ray.get(ref, timeout=120) == token for node, ref in refs.items()}
