"""Make the next batches while the training step runs: a producer thread ``depth`` batches ahead.

``ahead(batches, device)`` runs the iterator ``batches`` in a background thread and yields its
items in the same order. On CUDA the thread launches its work on a side stream, and each item
is handed over with an event the consumer's stream waits on (and its tensors marked as used
by that stream, so the caching allocator does not reuse their memory early): with
``data.augment_on=device`` the next batch's nvJPEG decoding and multi-crop overlap the
current step instead of following it. Items and their seeded contents are exactly those of
``batches``; an exception in the producer is raised in the consumer; closing the consumer
stops the producer. No Ray import.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

import torch

__all__ = ["ahead"]

T = TypeVar("T")
_END = object()


def _tensors(item) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, dict):
        for v in item.values():
            yield from _tensors(v)
    elif isinstance(item, (list, tuple)):
        for v in item:
            yield from _tensors(v)


def ahead(batches: Iterable[T], device: torch.device, depth: int = 1) -> Iterator[T]:
    """``batches``' items, made by a background thread up to ``depth`` items ahead."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    cuda = torch.device(device).type == "cuda"
    side = torch.cuda.Stream(device=device) if cuda else None
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if side is not None:  # a new thread starts on device 0 and its default stream
                torch.cuda.set_device(side.device)
                torch.cuda.set_stream(side)
            for item in batches:
                done = None
                if side is not None:
                    done = torch.cuda.Event()
                    done.record(side)
                if not put((item, done, None)):
                    return
            put((_END, None, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((None, None, exc))

    thread = threading.Thread(target=produce, name="rayssl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, done, exc = handoff.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            if done is not None:
                main = torch.cuda.current_stream(device)
                main.wait_event(done)
                for t in _tensors(item):
                    if t.device.type == "cuda":
                        t.record_stream(main)
            yield item
    finally:  # closed early or done: the producer stops at its next hand-off
        stop.set()
        try:
            while True:
                handoff.get_nowait()
        except queue.Empty:
            pass
        thread.join(timeout=1.0)
