"""Make the next batches while the training step runs: ``fn`` over a source, a few items ahead.

``ahead(items, fn, device, depth)`` yields ``fn(item)`` for each item of ``items``, in order.
The items are read on the caller's thread (a Ray Data iterator stays with the thread that
opened it); ``fn`` runs on one background thread, up to ``depth`` items ahead of the one
handed over. On CUDA that thread launches its work on a side stream, and each result is
handed over with an event the caller's stream waits on (its tensors marked as used by that
stream, so the caching allocator keeps their memory until the caller's work is done): with
``data.augment_on=device`` the nvJPEG decoding and multi-crop of the next batches overlap the
current step instead of following it.

``depth``: the training loop's ``lockstep`` takes batch t+1 before it runs step t, so the
worker uses ``depth=2``: batch t+1 was made while step t-1 ran, and its event gates step t
only on work already done. Up to ``depth`` + 2 batches of crops are then alive at once.

Results and their seeded contents are exactly those of ``map(fn, items)``; an exception of
``fn`` or of the source is raised in the caller after the results before it; closing the
caller's iterator cancels what was not started. No Ray import.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

__all__ = ["ahead"]

A = TypeVar("A")
B = TypeVar("B")


def _tensors(item) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, dict):
        for v in item.values():
            yield from _tensors(v)
    elif isinstance(item, (list, tuple)):
        for v in item:
            yield from _tensors(v)


def ahead(items: Iterable[A], fn: Callable[[A], B], device: torch.device, depth: int = 1) -> Iterator[B]:
    """``fn(item)`` for each of ``items``, in order, made by a background thread ``depth`` ahead."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    device = torch.device(device)
    side = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    def make(item):
        if side is None:
            return fn(item), None
        torch.cuda.set_device(side.device)  # a new thread starts on device 0 and its default stream
        with torch.cuda.stream(side):
            out = fn(item)
        done = torch.cuda.Event()
        done.record(side)
        return out, done

    source = iter(items)
    pending: deque = deque()
    error: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayssl-prefetch")
    try:
        while True:
            while error is None and len(pending) <= depth:
                try:
                    item = next(source)
                except StopIteration:
                    break
                except Exception as exc:  # raised after the results made before it
                    error = exc
                    break
                pending.append(pool.submit(make, item))
            if not pending:
                if error is not None:
                    raise error
                return
            out, done = pending.popleft().result()
            if done is not None:
                main = torch.cuda.current_stream(device)
                main.wait_event(done)
                for t in _tensors(out):
                    if t.device.type == "cuda":
                        t.record_stream(main)
            yield out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
