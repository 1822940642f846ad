"""Making the next batches while the step runs (``rayssl.data.prefetch.ahead``, used by the
worker's feed with ``augment_on=device``): the same results in the same order, made on another
thread; the source read on the caller's thread no further ahead than the depth; errors raised
in order; a caller that stops early stops the work. And starting the next epoch early
(``started``, ``TrainFeed.start``): its first batch asked for on another thread before the
caller reads, the same batches as read without it, errors raised on the caller's thread."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from rayssl.config import Config
from rayssl.data.feed import TrainFeed
from rayssl.data.formats import encode_image
from rayssl.data.prefetch import ahead, started
from rayssl.data.scenes import generate_batch

CPU = torch.device("cpu")


def _wait_for(cond, seconds=5.0):
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_results_come_in_order_made_on_another_thread():
    made_on = []

    def fn(i):
        made_on.append(threading.get_ident())
        return {"i": i, "x": torch.full((2,), float(i))}

    got = list(ahead(range(6), fn, CPU))
    assert [g["i"] for g in got] == list(range(6))
    assert all(torch.equal(g["x"], torch.full((2,), float(g["i"]))) for g in got)
    assert threading.get_ident() not in made_on and len(set(made_on)) == 1


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_the_source_is_read_on_the_callers_thread_no_further_than_the_depth(depth):
    read_on = []

    def source():
        for i in range(100):
            read_on.append(threading.get_ident())
            yield i

    done = []
    it = ahead(source(), lambda i: done.append(i) or i * 10, CPU, depth=depth)
    assert next(it) == 0
    assert len(read_on) == depth + 1  # the one handed over and `depth` ahead of it
    assert _wait_for(lambda: len(done) == depth + 1)  # and those are made while the caller works
    assert [next(it) for _ in range(3)] == [10, 20, 30]
    assert len(read_on) == depth + 4 and set(read_on) == {threading.get_ident()}
    it.close()


@pytest.mark.parametrize("where", ["fn", "source"])
def test_an_error_is_raised_after_the_results_before_it(where):
    def source():
        yield from (1, 2, 3)
        if where == "source":
            raise OSError("shard 7 is unreadable")

    def fn(i):
        if where == "fn" and i == 3:
            raise OSError("shard 7 is unreadable")
        return i

    it = ahead(source(), fn, CPU, depth=2)
    assert [next(it), next(it)] == [1, 2]
    if where == "source":
        assert next(it) == 3
    with pytest.raises(OSError, match="shard 7 is unreadable"):
        next(it)


def test_a_caller_that_stops_early_stops_the_work():
    made = []

    def slow(i):
        time.sleep(0.05)
        made.append(i)
        return i

    it = ahead(range(1000), slow, CPU, depth=3)
    assert next(it) == 0
    it.close()
    assert _wait_for(lambda: not any(t.name.startswith("rayssl-prefetch") for t in threading.enumerate()))
    assert len(made) <= 5  # the one handed over, at most one running; the queued ones cancelled


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(ahead([1], lambda i: i, CPU, depth=0))


class _Rows:
    """A dataset shard's ``iter_batches`` over encoded scenes (what Ray Data ships with
    ``augment_on=device``), without Ray."""

    def __init__(self, n: int):
        self.blobs = [encode_image(im) for im in generate_batch(range(n), seed=3, size=40)["image"]]

    def iter_batches(self, batch_size, drop_last, batch_format, local_shuffle_buffer_size, local_shuffle_seed):
        for a in range(0, len(self.blobs) - batch_size + 1, batch_size):
            yield {"key": np.arange(a, a + batch_size, dtype=np.uint64), "encoded": self.blobs[a:a + batch_size]}


CFG = {"data": {"augment_on": "device", "crop_sizes": [32, 16], "crop_counts": [2, 1], "shuffle_buffer": 0}}


def test_the_worker_feed_gives_the_same_crops_with_and_without_prefetch():
    cfg = Config.from_dict(CFG)
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


def test_a_ray_data_shard_gives_the_same_crops_with_prefetch(ray_session):
    rows = _Rows(12)
    ds = ray_session.data.from_items([{"key": k, "encoded": b} for k, b in enumerate(rows.blobs)],
                                     override_num_blocks=1)  # one block: one order
    cfg = Config.from_dict(CFG)
    runs = {}
    for prefetch in (False, True):
        feed = TrainFeed(ds, cfg.data, CPU, batch_size=4, seed=5, prefetch=prefetch)
        runs[prefetch] = [crops for crops, _ in feed.epoch(0)]
    assert len(runs[True]) == len(runs[False]) == 3
    # One block and no shuffle: the rows in their order, so also the same crops as without Ray.
    plain = [crops for crops, _ in TrainFeed(rows, cfg.data, CPU, batch_size=4, seed=5).epoch(0)]
    for a, b, c in zip(runs[False], runs[True], plain):
        assert all(torch.equal(x, y) and torch.equal(y, z) for x, y, z in zip(a, b, c))
    feed = TrainFeed(ds, cfg.data, CPU, batch_size=4, seed=5, prefetch=True)
    feed.start(0)  # Ray Data's iterator opened and first read on another thread, then read on here
    early = [crops for crops, _ in feed.epoch(0)]
    assert len(early) == 3
    assert all(torch.equal(x, y) for a, b in zip(plain, early) for x, y in zip(a, b))


def test_started_takes_the_first_item_on_another_thread_before_the_caller_reads():
    made_on = []

    def source():
        for i in range(4):
            made_on.append(threading.get_ident())
            yield i

    it = started(source())
    assert _wait_for(lambda: len(made_on) == 1)  # asked for before the caller reads
    time.sleep(0.05)
    assert len(made_on) == 1  # and no further
    assert list(it) == [0, 1, 2, 3]
    me = threading.get_ident()
    assert made_on[0] != me and made_on[1:] == [me] * 3


def test_started_raises_the_first_items_error_on_the_callers_thread_and_passes_an_empty_source():
    def broken():
        if True:
            raise OSError("shard unreadable")
        yield  # a generator

    it = started(broken())
    with pytest.raises(OSError, match="shard unreadable"):
        next(it)
    assert list(started(iter(()))) == []


def test_a_started_epoch_gives_the_same_crops_and_a_different_epoch_is_refused():
    cfg = Config.from_dict(CFG)
    rows = _Rows(12)
    plain = [crops for crops, _ in TrainFeed(rows, cfg.data, CPU, batch_size=4, seed=5).epoch(1, skip=1)]
    feed = TrainFeed(rows, cfg.data, CPU, batch_size=4, seed=5)
    feed.start(1, skip=1)
    early = [crops for crops, _ in feed.epoch(1, skip=1)]
    assert len(early) == len(plain) == 2
    assert all(torch.equal(x, y) for a, b in zip(plain, early) for x, y in zip(a, b))
    again = [crops for crops, _ in feed.epoch(1, skip=1)]  # not started this time: read as before
    assert all(torch.equal(x, y) for a, b in zip(plain, again) for x, y in zip(a, b))
    feed.start(2)
    with pytest.raises(ValueError, match="epoch 2 .* was started, epoch 3"):
        next(feed.epoch(3))


def test_the_worker_announces_an_epoch_before_any_rank_starts_reading_it():
    """Rank 0 sets the epoch the crop tasks seed by, then starts its pipeline; other ranks only
    start theirs (the shard's epoch begins once all have asked, so after rank 0's announcement)."""
    from rayssl.runtime.worker import start_epoch

    events = []

    class Stats:
        def set_epoch(self, epoch):
            events.append(("announce", epoch))

    class Feed:
        def start(self, epoch, skip=0):
            events.append(("start", epoch))

    assert start_epoch(Feed(), Stats(), 3, rank=0) == 3
    assert events == [("announce", 3), ("start", 3)]
    events.clear()
    start_epoch(Feed(), Stats(), 4, rank=1)
    assert events == [("start", 4)]


class _Shard:
    """A dataset shard that, like ``streaming_split``'s, must not be opened for an epoch while
    an iterator of the epoch before is still unread: it records the order of opens and ends."""

    def __init__(self, rows: _Rows):
        self.rows, self.log, self.open = rows, [], 0

    def iter_batches(self, **kw):
        assert self.open == 0, "an epoch opened while the one before was still being read"
        self.open += 1
        self.log.append("open")
        try:
            yield from self.rows.iter_batches(**kw)
        finally:
            self.open -= 1
            self.log.append("end")


def test_the_next_epoch_opens_only_after_the_one_before_was_read_to_its_end():
    cfg = Config.from_dict(CFG)
    shard = _Shard(_Rows(12))  # 3 batches of 4 an epoch
    feed = TrainFeed(shard, cfg.data, CPU, batch_size=4, seed=5)
    first = feed.epoch(0)
    assert [len(next(first)[0][0]) for _ in range(2)] == [4, 4]  # the loop stops a batch short
    feed.start(1)  # read to its end on the background thread, then epoch 1 opened there
    assert _wait_for(lambda: shard.log == ["open", "end", "open"])
    assert len(list(feed.epoch(1))) == 3
    rest = feed.epoch(2)
    next(rest)  # not started: epoch 1's iterator (read to its end) closes before epoch 2 opens
    assert shard.log == ["open", "end", "open", "end", "open"]
    feed.close()  # the epoch read last ends now, not when the garbage collector finds it
    assert shard.log[-1] == "end" and shard.open == 0
    with pytest.raises(ValueError, match="epoch 3 was started and not read yet"):
        feed.start(3)
        feed.start(4)
