"""How Ray Train hands the Ray Data streams to workers.

Ray Train's default `DataConfig` splits every dataset with `streaming_split(equal=True)`, which
may drop up to `world_size - 1` rows to even the shards out. That is right for training (every
worker must take the same number of optimizer steps, or the gradient all-reduce hangs), but
wrong for validation: metrics must see every sample exactly once. Validation needs no per-batch
collective (only the final metric all-reduce), so uneven shards are safe there.
"""

from __future__ import annotations

from ray.train import DataConfig


class ExactEvalDataConfig(DataConfig):
    def __init__(self, *, split_equal: list[str]):
        super().__init__(datasets_to_split="all")
        self._split_equal = set(split_equal)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        locality = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            # Ray Train replaces the dataset's execution options with its ingest defaults; keep the
            # object-store cap that `read_split` put on this dataset, or reads run ahead unbounded.
            limits = ds.context.execution_options.resource_limits
            options = self._resolve_execution_options(name)
            options.resource_limits = options.resource_limits.copy(
                object_store_memory=limits.object_store_memory
            )
            ds.context.execution_options = options
            splits = ds.streaming_split(world_size, equal=name in self._split_equal, locality_hints=locality)
            for i, split in enumerate(splits):
                output[i][name] = split
        return output
