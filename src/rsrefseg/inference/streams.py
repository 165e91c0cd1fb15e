"""The model-ready Ray Data streams of a config's splits: the prepared shards read (in a new
order every training epoch, in order for evaluation) and preprocessed for the config's model.
A train job hands them to Ray Train (`training.ingest` splits them over the workers); `evaluate`
feeds them to model replicas."""

from __future__ import annotations

from rsrefseg.platform.config import Config


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
                               seed=cfg.train.seed, cache=cache, decode=cfg.data.decode)
    return out
