"""Mixed datasets: how many rows each source gives a training epoch, and which.

A mixture (data.sources) has an epoch of as many rows as its sources hold together (`total`,
after data.limit); source i gets `round(total * w_i / sum(w))` of them (its budget), so the
weights are shares of the epoch, whatever the sources' sizes. A budget up to the source's size
is a subset of its rows; a larger one repeats the source (every row `budget // size` times, plus
a subset for the rest: oversampling). The subset is drawn by a permutation seeded with the run's
seed and the source's name, so a run's rows depend on the config alone; it is drawn once per
run (every epoch reads the same rows, in a new order).

    budgets = source_budgets({"rrsisd": 12181, "refsegrs": 2172}, {"rrsisd": 1, "refsegrs": 1})
    ds = sampled(read_split(path, "train"), size, budget, seed=seed, name="refsegrs")
"""

from __future__ import annotations

import zlib

import numpy as np
from ray.data.expressions import col


def source_budgets(sizes: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """name -> rows of a training epoch: `total * w / sum(w)` rounded, total = sum(sizes).
    A source's budget is at least 1 row (a weight > 0 always draws something)."""
    total = sum(sizes.values())
    weight = sum(weights[name] for name in sizes)
    return {name: max(1, round(total * weights[name] / weight)) for name in sizes}


def chosen_rows(size: int, budget: int, *, seed: int, name: str) -> tuple[int, np.ndarray]:
    """(full copies of the source, the sorted row indexes of the partial copy): together
    `budget` rows. Seeded by `seed` and the source's name (one draw per source)."""
    if size < 1:
        raise ValueError(f"source {name!r} has no rows")
    copies, rest = divmod(budget, size)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return copies, np.sort(rng.permutation(size)[:rest])


def sampled(ds, size: int, budget: int, *, seed: int, name: str):
    """`budget` rows of the source `ds` (rows of one split, with its `index` column 0..size-1):
    `chosen_rows` of it, as a lazy, streaming Dataset (a union of the copies)."""
    copies, rest = chosen_rows(size, budget, seed=seed, name=name)
    parts = [ds] * copies
    if len(rest):
        parts.append(ds.filter(expr=col("index").is_in(rest.tolist())))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
