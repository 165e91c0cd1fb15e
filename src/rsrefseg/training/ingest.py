"""How Ray Data feeds a job: the streams of a config's splits, and how Ray Train hands them to
its workers.

Ray Train's default `DataConfig` splits every dataset with `streaming_split(equal=True)`, which
may drop up to `world_size - 1` rows to even the shards out. That is right for training (every
worker must take the same number of optimizer steps, or the gradient all-reduce hangs), but
wrong for validation: metrics must see every sample exactly once. Validation needs no per-batch
collective (only the final metric all-reduce), so uneven shards are safe there.
"""

from __future__ import annotations

from ray.train import DataConfig

from rsrefseg.datasets.pipeline import without_operator_reservations


class ExactEvalDataConfig(DataConfig):
    """Splits every dataset across the workers; only those named in `split_equal` evenly."""

    def __init__(self, *, split_equal: list[str], enable_shard_locality: bool = True):
        super().__init__(datasets_to_split="all", enable_shard_locality=enable_shard_locality)
        self._split_equal = set(split_equal)
        self._shard_locality = enable_shard_locality

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        import copy

        output = [{} for _ in range(world_size)]
        locality = worker_node_ids if self._shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            # Ray Train replaces the dataset's execution options with its ingest defaults; keep the
            # object-store cap that `read_split` put on this dataset, or reads run ahead unbounded.
            limits = ds.context.execution_options.resource_limits
            options = copy.deepcopy(self.default_ingest_options())  # shares objects with the DataContext
            options.resource_limits = options.resource_limits.copy(
                object_store_memory=limits.object_store_memory
            )
            ds.context.execution_options = options
            without_operator_reservations(ds)  # a train worker's loop is its only consumer
            splits = ds.streaming_split(world_size, equal=name in self._split_equal, locality_hints=locality)
            for i, split in enumerate(splits):
                output[i][name] = split
        return output
