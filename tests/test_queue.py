"""FeatureQueue: FIFO order, fill state, aligned fields, errors, state_dict round trip.

The cross-rank behaviour (enqueue(gather=True)) is tested in test_sinkhorn.py, which
already pays for a 2-process gloo group.
"""
from __future__ import annotations

import pytest
import torch

from rayssl.modules.queue import FeatureQueue


def rows(*values: float, dim: int = 2) -> torch.Tensor:
    """(len(values), dim) keys whose row r is filled with values[r]."""
    return torch.tensor(values, dtype=torch.float32)[:, None].repeat(1, dim)


def first_column(q: FeatureQueue, i: int = 0) -> list[float]:
    return q.field(i)[:, 0].tolist()


def test_starts_empty():
    q = FeatureQueue(5, 2)
    assert len(q) == 0 and not q.is_full and int(q.filled) == 0
    assert q.field().shape == (5, 2) and q.field().dtype == torch.float32
    assert q.valid().shape == (0, 2)
    assert q.filled.dtype == torch.long
    assert bool(q)  # an empty queue is still a queue: no surprise in `if queue:`


def test_newest_first_and_oldest_dropped():
    q = FeatureQueue(5, 2)
    q.enqueue(rows(1, 2))
    assert first_column(q) == [1, 2, 0, 0, 0]
    assert len(q) == 2 and not q.is_full
    assert q.valid()[:, 0].tolist() == [1, 2]

    q.enqueue(rows(3, 4))
    assert first_column(q) == [3, 4, 1, 2, 0]
    assert len(q) == 4 and not q.is_full

    q.enqueue(rows(5, 6))  # wraps: the oldest row (2) falls off
    assert first_column(q) == [5, 6, 3, 4, 1]
    assert len(q) == 5 and q.is_full
    assert torch.equal(q.valid(), q.field())

    q.enqueue(rows(7, 8, 9))
    assert first_column(q) == [7, 8, 9, 5, 6]
    assert len(q) == 5 and q.is_full

    q.enqueue(rows(10, 11, 12, 13, 14))  # exactly `length` rows replace everything
    assert first_column(q) == [10, 11, 12, 13, 14]

    q.enqueue(rows(dim=2)[:0])  # an empty batch is a no-op
    assert first_column(q) == [10, 11, 12, 13, 14]


def test_full_row_content_is_kept():
    q = FeatureQueue(4, 3)
    a, b = torch.randn(2, 3), torch.randn(3, 3)
    q.enqueue(a)
    q.enqueue(b)
    assert torch.equal(q.field(), torch.cat([b, a[:1]]))


def test_two_fields_stay_aligned():
    q = FeatureQueue(6, (3, 2))
    assert q.field(0).shape == (6, 3) and q.field(1).shape == (6, 2)
    for step in range(5):
        ids = torch.arange(4, dtype=torch.float32) + 10 * step
        q.enqueue(rows(*ids.tolist(), dim=3), -rows(*ids.tolist(), dim=2))
        assert torch.equal(q.field(0)[:, 0], -q.field(1)[:, 0])
        assert q.valid(0).shape == (len(q), 3) and q.valid(1).shape == (len(q), 2)
    assert first_column(q, 0) == [40, 41, 42, 43, 30, 31]
    assert first_column(q, 1) == [-40, -41, -42, -43, -30, -31]


def test_keys_are_detached_and_cast():
    q = FeatureQueue(4, 2)
    keys = torch.randn(2, 2, requires_grad=True)
    q.enqueue(keys.double() * 2)
    assert q.field().dtype == torch.float32 and not q.field().requires_grad
    torch.testing.assert_close(q.valid(), (keys.detach() * 2))


def test_errors():
    q = FeatureQueue(4, (3, 2))
    with pytest.raises(ValueError, match="length 4"):
        q.enqueue(torch.zeros(5, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError):
        q.enqueue(torch.zeros(2, 3))  # one field missing
    with pytest.raises(ValueError):
        q.enqueue(torch.zeros(2, 3), torch.zeros(3, 2))  # batch sizes differ
    with pytest.raises(ValueError):
        q.enqueue(torch.zeros(2, 4), torch.zeros(2, 2))  # wrong width
    assert len(q) == 0 and torch.equal(q.field(0), torch.zeros(4, 3))  # nothing half-applied
    with pytest.raises(IndexError):
        q.field(2)
    with pytest.raises(ValueError):
        FeatureQueue(0, 3)


def test_state_dict_round_trip():
    q = FeatureQueue(7, (3, 2))
    for step in range(3):
        q.enqueue(torch.randn(3, 3), torch.randn(3, 2))
    state = q.state_dict()
    assert set(state) == {"field_0", "field_1", "filled"}

    fresh = FeatureQueue(7, (3, 2))
    fresh.load_state_dict(state)
    for name, value in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert len(fresh) == 7 and fresh.is_full

    # and the restored queue carries on exactly like the original
    nxt = (torch.randn(2, 3), torch.randn(2, 2))
    q.enqueue(*nxt)
    fresh.enqueue(*nxt)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), fresh.state_dict().values()))

    # a partially filled queue keeps its fill level through the round trip
    partial = FeatureQueue(7, (3, 2))
    partial.enqueue(torch.randn(2, 3), torch.randn(2, 2))
    again = FeatureQueue(7, (3, 2))
    again.load_state_dict(partial.state_dict())
    assert len(again) == 2 and not again.is_full


def test_buffers_are_registered():
    q = FeatureQueue(3, (2, 4))
    # buffers, not parameters: saved and moved with the module, never optimised
    assert {name for name, _ in q.named_buffers()} == {"field_0", "field_1", "filled"}
    assert list(q.parameters()) == []
