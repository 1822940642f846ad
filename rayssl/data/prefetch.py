"""Make the next batches while the training step runs: ``fn`` over a source, a few items ahead.

``ahead(items, fn, device, depth)`` yields ``fn(item)`` for each item of ``items``, in order.
The items are read on the caller's thread (a Ray Data iterator is read by one thread at a
time, and ``ahead`` reads no further than it hands over); ``fn`` runs on one background thread, up to ``depth`` items ahead of the one
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
caller's iterator cancels what was not started.

``started(items)`` asks for the first item of ``items`` now, on a background thread, and
hands the iterator over once it has it: the training loop starts the next epoch's pipeline
this way while the epoch's last step runs (``rayssl.data.feed.TrainFeed.start``). No Ray import.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

__all__ = ["ahead", "started"]

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


def started(items: Iterable[A]) -> Iterator[A]:
    """``items``' items, in order; the first is asked for now, on a background thread.

    The source's start-up (for a Ray Data iterator: planning, launching the tasks, the first
    rows made) runs while the caller does other work; iterating joins the thread, raises what
    the first ``next`` raised, and goes on with the same iterator on the caller's thread (one
    thread at a time: the background thread is done before the caller reads on)."""
    source = iter(items)
    first: list = []
    failed: list[BaseException] = []

    def take() -> None:
        try:
            first.append(next(source))
        except StopIteration:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=take, name="rayssl-next-epoch", daemon=True)
    thread.start()

    def handed_over() -> Iterator[A]:
        thread.join()
        if failed:
            raise failed[0]
        if not first:
            return
        yield first.pop()
        yield from source

    return handed_over()
