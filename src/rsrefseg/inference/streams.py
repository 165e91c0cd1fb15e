"""The model-ready Ray Data streams of a config's splits: the prepared shards read (in a new
order every training epoch, in order for evaluation) and preprocessed for the config's model.
A train job hands them to Ray Train (`training.ingest` splits them over the workers); `evaluate`
feeds them to model replicas.

A mixture (data.sources) is the union of its sources' streams, each row tagged with its source
(the `source` column). Its train split holds each source's budget of rows
(`datasets.mixing`: shares of the epoch by weight); every other split holds every row of every
source."""

from __future__ import annotations

from rsrefseg.platform.config import Config, DataSource


def train_budgets(cfg: Config) -> dict[str, int]:
    """Rows of one training epoch per source: the split's size for data.path alone, the
    weighted budgets (`datasets.mixing.source_budgets`) for a mixture."""
    from rsrefseg.datasets.mixing import source_budgets
    from rsrefseg.datasets.pipeline import split_size

    sources = cfg.data.source_list()
    sizes = {s.name: split_size(s.path, cfg.data.train_split, limit=cfg.data.limit) for s in sources}
    if not cfg.data.sources:
        return sizes
    return source_budgets(sizes, {s.name: s.weight for s in sources})


def build_datasets(cfg: Config, *, splits: dict[str, str], epochs: bool = False) -> dict:
    """Ray Data streams for the named splits ({"train": "train", "val": "val"}). `epochs`: the
    streams are read once per epoch (a train job), so a split whose preprocessed rows fit in
    data.cache_mib is preprocessed once, up front, and kept in the object store. (With pixels
    shipped at their stored size, a 512 x 512 sample keeps 0.8 MiB.)"""
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.tokenizer import load_tokenizer

    sizes = input_sizes(cfg.model, cfg.data.label_size)
    tokenizer = load_tokenizer(cfg.model)
    out = {}
    for name, split in splits.items():
        budgets = train_budgets(cfg) if name == "train" and cfg.data.sources else {}
        parts = [_source_stream(cfg, source, split, sizes, tokenizer, train=name == "train", epochs=epochs,
                                budget=budgets.get(source.name)) for source in cfg.data.source_list()]
        out[name] = _union(parts, seed=cfg.train.seed)
    return out


def _source_stream(cfg: Config, source: DataSource, split: str, sizes, tokenizer, *, train: bool, epochs: bool,
                   budget: int | None):
    """One source's preprocessed rows of `split` (its `budget` of them when given)."""
    from rsrefseg.datasets.mixing import sampled
    from rsrefseg.datasets.pipeline import cache_fits, preprocess, read_split, split_size
    from rsrefseg.datasets.prepare import load_manifest

    largest = load_manifest(source.path).get("largest_image", {})
    rows = split_size(source.path, split, limit=cfg.data.limit)
    kept = rows if budget is None else budget
    cache = epochs and split in largest and cache_fits(kept, tuple(largest[split]), sizes, cfg.data.cache_mib << 20)
    # Training reads its shards in a new order every epoch (or once, when cached: then the
    # workers' shuffle buffers mix the rows); evaluation reads them in order.
    whole = ds = read_split(source.path, split, limit=cfg.data.limit, shuffle_seed=cfg.train.seed if train else None)
    if budget is not None:
        ds = sampled(ds, rows, budget, seed=cfg.train.seed, name=source.name)
    # Flips (data.augment) are drawn on the train workers' devices (models.device_inputs).
    # Shuffled phrases (the control) are dealt over the source's whole split, each row once.
    return preprocess(ds, sizes, tokenizer, shuffle_phrases=cfg.data.shuffle_phrases and train,
                      seed=cfg.train.seed, cache=cache, source=source.name, phrases_of=whole,
                      decode=cfg.data.decode)


def _union(parts: list, *, seed: int):
    """One stream of the sources' streams. Streamed sources interleave as their read tasks finish;
    cached ones (already in the object store) would follow each other block by block, so their
    blocks are put in a seeded random order (which moves references, not rows)."""
    from ray.data.dataset import MaterializedDataset

    if len(parts) == 1:
        return parts[0]
    ds = parts[0].union(*parts[1:])
    if all(isinstance(part, MaterializedDataset) for part in parts):
        ds = ds.randomize_block_order(seed=seed)
    return ds
