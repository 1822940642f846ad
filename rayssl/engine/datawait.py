"""How long the training loop waits for its next batch: is the input pipeline keeping up?

The official SwAV code logs a per-iteration "data time" next to the step time for the same
reason: a run that is slower than it should be is either compute-bound (the wait is near
zero) or input-bound (the wait is a large share of the time). ``DataWait.wrap`` times the
moments the loop is blocked in ``next()`` on its batch iterator, and nothing else: the
step, logging and checkpointing between two batches are not counted.

Host time: on a GPU the host queues the step and asks for the next batch before the device
finishes, so a small wait there does not prove the device never idled; a large one does
show the pipeline falling behind. Pure Python (no Ray, no torch).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["DataWait"]


class DataWait:
    """Accumulates the time spent waiting in ``next()`` on wrapped iterators.

    ``epoch_s``: the total since the last ``wrap``; ``first_batch_s``: the wait for the
    first batch of the last ``wrap`` (the pipeline's start-up, e.g. a shuffle buffer
    filling), None before it arrives; ``take_window()``: the total since the previous call.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.epoch_s = 0.0
        self.first_batch_s: float | None = None
        self._window_s = 0.0

    def wrap(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield ``batches`` unchanged, timing each wait for the next one (a new epoch)."""
        self.epoch_s, self.first_batch_s = 0.0, None
        it = iter(batches)
        while True:
            t = self._clock()
            try:
                item = next(it)
            except StopIteration:
                self._add(self._clock() - t)  # the wait to learn that the epoch is over
                return
            waited = self._clock() - t
            self._add(waited)
            if self.first_batch_s is None:
                self.first_batch_s = waited
            yield item

    def _add(self, seconds: float) -> None:
        self.epoch_s += seconds
        self._window_s += seconds

    def take_window(self) -> float:
        """Seconds waited since the previous call (or since construction)."""
        w, self._window_s = self._window_s, 0.0
        return w
