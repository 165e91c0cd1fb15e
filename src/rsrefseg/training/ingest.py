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

from rsrefseg.platform.config import Config


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


def build_datasets(cfg: Config, *, splits: dict[str, str], epochs: bool = False) -> dict:
    """Ray Data streams for the named splits ({"train": "train", "val": "val"}). `epochs`: the
    streams are read once per epoch (a train job), so a split whose preprocessed rows fit in
    data.cache_mib is preprocessed once, up front, and kept in the object store. (With pixels
    shipped at their stored size, a 512 x 512 sample keeps 0.8 MiB.)"""
    from rsrefseg.datasets.pipeline import cache_fits, preprocess, read_split, split_size
    from rsrefseg.datasets.prepare import load_manifest
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.tokenizer import load_tokenizer

    sizes = input_sizes(cfg.model, cfg.data.label_size)
    tokenizer = load_tokenizer(cfg.model)
    largest = load_manifest(cfg.data.path).get("largest_image", {})
    out = {}
    for name, split in splits.items():
        is_train = name == "train"
        rows = split_size(cfg.data.path, split, limit=cfg.data.limit)
        cache = epochs and split in largest and cache_fits(rows, tuple(largest[split]), sizes, cfg.data.cache_mib << 20)
        # Training reads its shards in a new order every epoch (or once, when cached: then the
        # workers' shuffle buffers mix the rows); evaluation reads them in order.
        ds = read_split(cfg.data.path, split, limit=cfg.data.limit,
                        shuffle_seed=cfg.train.seed if is_train else None)
        # Flips (data.augment) are drawn on the train workers' devices (models.device_inputs).
        out[name] = preprocess(ds, sizes, tokenizer, shuffle_phrases=cfg.data.shuffle_phrases and is_train,
                               seed=cfg.train.seed, cache=cache)
    return out
