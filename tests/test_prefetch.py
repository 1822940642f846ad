"""Making the next batch while the step runs (``rayssl.data.prefetch.ahead``, used by the
worker's feed with ``augment_on=device``): same items in the same order, a bounded look-ahead,
the producer's error raised in the consumer, and a consumer that stops early stops the producer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from rayssl.config import Config
from rayssl.data.feed import TrainFeed
from rayssl.data.formats import encode_image
from rayssl.data.prefetch import ahead
from rayssl.data.scenes import generate_batch

CPU = torch.device("cpu")


def _wait_for(cond, seconds=5.0):
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_items_come_in_order_made_on_another_thread():
    made_on = []

    def items():
        for i in range(6):
            made_on.append(threading.get_ident())
            yield {"i": i, "x": torch.full((2,), float(i))}

    got = list(ahead(items(), CPU))
    assert [g["i"] for g in got] == list(range(6))
    assert all(torch.equal(g["x"], torch.full((2,), float(g["i"]))) for g in got)
    assert set(made_on) != {threading.get_ident()} and len(set(made_on)) == 1


@pytest.mark.parametrize("depth", [1, 3])
def test_the_producer_runs_ahead_but_no_further_than_its_depth(depth):
    made = []

    def items():
        for i in range(100):
            made.append(i)
            yield i

    it = ahead(items(), CPU, depth=depth)
    assert next(it) == 0
    # One handed over, `depth` waiting in the hand-off, and one made and waiting to be put.
    assert _wait_for(lambda: len(made) == depth + 2)
    time.sleep(0.2)
    assert len(made) == depth + 2
    assert next(it) == 1
    it.close()


def test_an_error_in_the_producer_is_raised_in_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise OSError("shard 7 is unreadable")

    it = ahead(items(), CPU)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(OSError, match="shard 7 is unreadable"):
        next(it)


def test_a_consumer_that_stops_early_stops_the_producer():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = ahead(endless(), CPU)
    assert next(it) == 0
    it.close()
    assert _wait_for(lambda: not any(t.name == "rayssl-prefetch" for t in threading.enumerate()))
    assert closed.wait(5)


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(ahead(iter([1]), CPU, depth=0))


class _Rows:
    """A dataset shard's ``iter_batches`` over encoded scenes (what Ray Data ships with
    ``augment_on=device``), without Ray."""

    def __init__(self, n: int):
        self.blobs = [encode_image(im) for im in generate_batch(range(n), seed=3, size=40)["image"]]

    def iter_batches(self, batch_size, drop_last, batch_format, local_shuffle_buffer_size, local_shuffle_seed):
        for a in range(0, len(self.blobs) - batch_size + 1, batch_size):
            yield {"key": np.arange(a, a + batch_size, dtype=np.uint64), "encoded": self.blobs[a:a + batch_size]}


def test_the_worker_feed_gives_the_same_crops_with_and_without_prefetch():
    cfg = Config.from_dict({"data": {"augment_on": "device", "crop_sizes": [32, 16], "crop_counts": [2, 1],
                                     "shuffle_buffer": 0}})
    rows = _Rows(12)
    runs = {}
    for prefetch in (False, True):
        feed = TrainFeed(rows, cfg.data, CPU, batch_size=4, seed=5, prefetch=prefetch)
        runs[prefetch] = [crops for crops, _ in feed.epoch(2, skip=1)]
    assert len(runs[True]) == len(runs[False]) == 2
    for a, b in zip(runs[False], runs[True]):
        assert [c.shape for c in a] == [(4, 3, 32, 32), (4, 3, 32, 32), (4, 3, 16, 16)]
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(runs[True][0][0], runs[True][1][0])
    assert TrainFeed(rows, cfg.data, CPU, batch_size=4, seed=5).prefetch is False  # default: on CUDA only


def test_a_ray_data_shard_read_from_the_prefetch_thread_gives_the_same_crops(ray_session):
    # The worker's case: Ray Data's iterator is driven from the producer thread.
    rows = _Rows(12)
    ds = ray_session.data.from_items([{"key": k, "encoded": b} for k, b in enumerate(rows.blobs)],
                                     override_num_blocks=1)  # one block: one order
    cfg = Config.from_dict({"data": {"augment_on": "device", "crop_sizes": [32, 16], "crop_counts": [2, 1],
                                     "shuffle_buffer": 0}})
    runs = {}
    for prefetch in (False, True):
        feed = TrainFeed(ds, cfg.data, CPU, batch_size=4, seed=5, prefetch=prefetch)
        runs[prefetch] = [crops for crops, _ in feed.epoch(0)]
    assert len(runs[True]) == len(runs[False]) == 3
    for a, b in zip(runs[False], runs[True]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # One block and no shuffle: the rows in their order, so the same crops as without Ray.
    plain = [crops for crops, _ in TrainFeed(rows, cfg.data, CPU, batch_size=4, seed=5).epoch(0)]
    assert all(torch.equal(x, y) for a, b in zip(plain, runs[True]) for x, y in zip(a, b))
