"""A first-in-first-out feature queue with one or more aligned fields.

SwAV keeps one queue of past embeddings to stabilise the codes for small batches
(Caron et al. 2020, arXiv:2006.09882, Sec. 4 / App. "queue"); MLS keeps two queues
(backbone features Q_g and projector outputs Q_z) whose slots must correspond
(Zhu, Fu, Wu 2023, arXiv:2308.03286). Storing all fields in one object and enqueueing
them in one call makes misaligned slots impossible.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rayssl import dist

__all__ = ["FeatureQueue"]


class FeatureQueue(nn.Module):
    """Fixed-length queue of float32 rows, newest first, with ``n`` aligned fields.

    Buffers (saved in ``state_dict``, moved by ``.to()``):
        ``field_i``: (length, d_i) float32, rows ordered newest first; rows past
        ``filled`` are zeros.
        ``filled``: 0-d long, how many leading rows hold real keys.

    Args:
        length: number of rows (slots) per field.
        dims: the feature width of each field; an int for a single field.
    """

    def __init__(self, length: int, dims: int | Sequence[int]):
        super().__init__()
        dims = (dims,) if isinstance(dims, int) else tuple(int(d) for d in dims)
        if length <= 0:
            raise ValueError(f"queue length must be > 0, got {length}")
        if not dims or any(d <= 0 for d in dims):
            raise ValueError(f"queue dims must be positive, got {dims}")
        self.length = int(length)
        self.dims = dims
        for i, d in enumerate(dims):
            self.register_buffer(f"field_{i}", torch.zeros(self.length, d, dtype=torch.float32))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        # Host copy of ``filled``: ``len``/``is_full`` are asked every step, and reading the
        # device buffer would sync the GPU each time. None = re-read once (after a load).
        self._filled_host: int | None = 0

    @property
    def num_fields(self) -> int:
        return len(self.dims)

    def field(self, i: int = 0) -> torch.Tensor:
        """The whole buffer of field ``i``: (length, d_i), newest row first."""
        if not 0 <= i < self.num_fields:
            raise IndexError(f"field {i} out of range for a queue with {self.num_fields} field(s)")
        return getattr(self, f"field_{i}")

    def valid(self, i: int = 0) -> torch.Tensor:
        """The filled rows of field ``i``: (len(self), d_i), newest row first."""
        return self.field(i)[: len(self)]

    @property
    def is_full(self) -> bool:
        return len(self) == self.length

    def __len__(self) -> int:
        """Number of valid (filled) rows, at most ``length``."""
        if self._filled_host is None:
            self._filled_host = int(self.filled)
        return self._filled_host

    def __bool__(self) -> bool:
        # Without this, an empty queue would be falsy through __len__, and
        # ``if queue:`` would silently mean "if queue is non-empty".
        return True

    @torch.no_grad()
    def enqueue(self, *keys: torch.Tensor, gather: bool = False) -> None:
        """Push one batch of keys per field to the front of the queue.

        Args:
            keys: one (B, d_i) tensor per field, all with the same B; detached and
                cast to float32 on the queue's device.
            gather: all-gather every field across ranks first (rank order), so that
                every rank enqueues the same global (world_size * B) rows and the queues
                stay identical everywhere. Collective: every rank must call it with the
                same B.

        After enqueueing rows x_0..x_{B-1}, the queue reads x_0..x_{B-1} followed by
        its previous contents; rows pushed past ``length`` are dropped.

        Raises:
            ValueError: wrong number of fields, mismatched shapes, or more rows than
                ``length`` in one call.
        """
        if len(keys) != self.num_fields:
            raise ValueError(f"enqueue got {len(keys)} key tensors for a queue with {self.num_fields} field(s)")
        prepared = []
        for i, k in enumerate(keys):
            buf = self.field(i)
            if k.dim() != 2 or k.shape[1] != buf.shape[1]:
                raise ValueError(f"field {i} expects (B, {buf.shape[1]}) keys, got {tuple(k.shape)}")
            if k.shape[0] != keys[0].shape[0]:
                raise ValueError(f"all fields need the same batch size, got {[tuple(x.shape) for x in keys]}")
            prepared.append(k.detach().to(device=buf.device, dtype=torch.float32))
        if gather:
            prepared = [dist.all_gather_cat(k) for k in prepared]
        b = prepared[0].shape[0]
        if b > self.length:
            raise ValueError(
                f"cannot enqueue {b} rows into a queue of length {self.length}"
                + (" (after gathering from all ranks)" if gather else "")
            )
        if b == 0:
            return
        for i, k in enumerate(prepared):
            buf = self.field(i)
            # Shift the old rows back by b (oldest fall off). The source and destination
            # overlap, so copy the source first.
            if b < self.length:
                buf[b:] = buf[: self.length - b].clone()
            buf[:b] = k
        before = len(self)
        self.filled.add_(b).clamp_(max=self.length)
        self._filled_host = min(self.length, before + b)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._filled_host = None  # ``filled`` was replaced: read it once, lazily

    def extra_repr(self) -> str:
        return f"length={self.length}, dims={self.dims}"
