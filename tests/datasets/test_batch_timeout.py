"""The batch watchdog: a stuck pipeline fails with a message instead of waiting forever."""

from __future__ import annotations

import threading
import time

import pytest

from rsrefseg.datasets.pipeline import BatchTimeout, watched


def test_a_stuck_source_fails_after_the_timeout_with_the_cluster_state():
    never = threading.Event()

    def stuck():
        yield "first"
        never.wait()  # a starved Ray Data stream: no error, no data
        yield "never"

    items = watched(stuck(), 0.5, on_timeout=lambda: "cluster: CPU 0.0/2.0 free")
    assert next(items) == "first"
    t0 = time.monotonic()
    with pytest.raises(BatchTimeout) as err:
        next(items)
    assert 0.4 < time.monotonic() - t0 < 5
    assert "no batch for 0.5 s after 1 batch(es)" in str(err.value)
    assert "CPU 0.0/2.0 free" in str(err.value) and "train.batch_timeout_s" in str(err.value)
    never.set()


def test_items_and_errors_pass_through_and_slow_consumers_are_not_timed():
    def source():
        yield from range(3)
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for item in watched(source(), 0.3):
            time.sleep(0.5)  # a training step longer than the timeout
            got.append(item)
    assert got == [0, 1, 2]
    assert list(watched(iter(range(5)), 1.0)) == list(range(5))
