"""DataWait counts the time blocked in next() on the batch iterator, and only that."""

from __future__ import annotations

import pytest

from rayssl.engine.datawait import DataWait


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _slow_source(clock: FakeClock, costs):
    """Yields one item per cost, each taking ``cost`` seconds of (fake) time to produce."""
    for i, cost in enumerate(costs):
        clock.now += cost
        yield i


def test_counts_waits_not_the_consumers_work():
    clock = FakeClock()
    waits = DataWait(clock)
    costs = [5.0, 1.0, 2.0, 0.5]  # the first batch is the slow start-up
    seen = []
    for item in waits.wrap(_slow_source(clock, costs)):
        seen.append(item)
        clock.now += 3.0  # the training step: not a wait
    assert seen == [0, 1, 2, 3]  # items pass through unchanged, in order
    assert waits.epoch_s == pytest.approx(sum(costs))
    assert waits.first_batch_s == pytest.approx(5.0)
    assert waits.take_window() == pytest.approx(sum(costs))
    assert waits.take_window() == 0.0


def test_windows_split_the_waits_and_a_new_epoch_resets_its_totals():
    clock = FakeClock()
    waits = DataWait(clock)
    windows = []
    for i, _ in enumerate(waits.wrap(_slow_source(clock, [1.0, 2.0, 4.0, 8.0]))):
        clock.now += 10.0
        if i % 2 == 1:  # a progress line every two steps
            windows.append(waits.take_window())
    assert windows == [pytest.approx(3.0), pytest.approx(12.0)]
    assert waits.epoch_s == pytest.approx(15.0)

    # The next epoch: its own totals; the time to learn the epoch is over counts too.
    def ends_slowly():
        yield from _slow_source(clock, [0.5])
        clock.now += 7.0  # e.g. the last rank's flag arriving late

    assert list(waits.wrap(ends_slowly())) == [0]
    assert waits.first_batch_s == pytest.approx(0.5) and waits.epoch_s == pytest.approx(7.5)
    assert waits.take_window() == pytest.approx(7.5)


def test_empty_epoch_has_no_first_batch():
    clock = FakeClock()
    waits = DataWait(clock)
    assert list(waits.wrap(iter([]))) == []
    assert waits.first_batch_s is None and waits.epoch_s == 0.0
