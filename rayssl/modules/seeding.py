"""Seeded randomness for a side computation that must leave the training's random streams alone."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["cpu_seeded", "untouched_streams"]


@contextlib.contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """Inside: torch's CPU generator seeded with ``seed``; after: its state as before.

    Only the CPU generator: ``torch.manual_seed`` would also reseed every CUDA generator, which
    ``fork_rng(devices=[])`` does not restore, so on a GPU the training's CUDA stream (MoCo's
    shuffles, dropout) would restart at the same state after every evaluation. Modules built in
    here are initialised on the CPU (then moved), so the CPU generator is the one they draw from.
    """
    with untouched_streams("cpu"):
        torch.default_generator.manual_seed(seed)
        yield


@contextlib.contextmanager
def untouched_streams(device: torch.device | str) -> Iterator[None]:
    """Inside: anything may draw from torch's generators (the CPU's, and ``device``'s on a GPU);
    after: they are where they were, as if nothing had run (an evaluation between epochs)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
