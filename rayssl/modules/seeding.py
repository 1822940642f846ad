"""Seeded randomness for a side computation that must leave the training's random streams alone."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["cpu_seeded"]


@contextlib.contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """Inside: torch's CPU generator seeded with ``seed``; after: its state as before.

    Only the CPU generator: ``torch.manual_seed`` would also reseed every CUDA generator, which
    ``fork_rng(devices=[])`` does not restore, so on a GPU the training's CUDA stream (MoCo's
    shuffles, dropout) would restart at the same state after every evaluation. Modules built in
    here are initialised on the CPU (then moved), so the CPU generator is the one they draw from.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
