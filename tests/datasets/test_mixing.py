"""A mixture's training epoch: each source's budget by weight, drawn reproducibly for a seed."""

from collections import Counter

import pytest

from rsrefseg.datasets.mixing import chosen_rows, sampled, source_budgets


def test_budgets_are_shares_of_all_the_rows_by_weight():
    assert source_budgets({"a": 100, "b": 20}, {"a": 1, "b": 1}) == {"a": 60, "b": 60}
    assert source_budgets({"a": 100, "b": 20}, {"a": 1, "b": 2}) == {"a": 40, "b": 80}
    assert source_budgets({"a": 100}, {"a": 5}) == {"a": 100}  # one source: all of it
    assert source_budgets({"a": 1000, "b": 1}, {"a": 1e6, "b": 1e-6})["b"] == 1  # never nothing


def test_rows_are_reproducible_for_a_seed_and_differ_between_seeds_and_sources():
    copies, rest = chosen_rows(50, 20, seed=7, name="a")
    assert copies == 0 and len(rest) == 20 == len(set(rest.tolist())) and rest.max() < 50
    assert chosen_rows(50, 20, seed=7, name="a")[1].tolist() == rest.tolist()
    assert chosen_rows(50, 20, seed=8, name="a")[1].tolist() != rest.tolist()
    assert chosen_rows(50, 20, seed=7, name="b")[1].tolist() != rest.tolist()


def test_oversampling_repeats_every_row_then_a_subset():
    copies, rest = chosen_rows(10, 34, seed=0, name="small")
    assert copies == 3 and len(rest) == 4
    counts = Counter(list(range(10)) * copies + rest.tolist())
    assert sum(counts.values()) == 34 and set(counts.values()) <= {3, 4}


@pytest.mark.parametrize("budget", [5, 24])
def test_the_sampled_stream_holds_the_budget(ray_session, budget):
    import ray.data

    ds = ray.data.from_items([{"index": i, "id": f"s{i}"} for i in range(12)])
    rows = sampled(ds, 12, budget, seed=3, name="x").take_all()
    assert len(rows) == budget
    copies, rest = chosen_rows(12, budget, seed=3, name="x")
    assert Counter(r["index"] for r in rows) == Counter(list(range(12)) * copies + rest.tolist())
