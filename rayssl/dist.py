"""torch.distributed helpers that degrade to no-ops in a single process.

Losses and modules call these unconditionally, so the same code runs inside a Ray
Train worker (where a process group exists) and in a plain unit test (where none does).
Nothing here imports Ray.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is usable and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without a group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 without a group)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place; returns ``t``."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all ranks, in place; returns ``t``."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (B, ...) from every rank along dim 0, in rank order.

    Every rank must pass a tensor of the same shape; the result is (world_size * B, ...)
    and carries no gradient. Without a group (or with one rank) ``t`` itself is returned.
    """
    if not is_distributed() or world_size() == 1:
        return t
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


def all_to_all_rows(t: torch.Tensor, sent: list[int], received: list[int]) -> torch.Tensor:
    """Exchange rows: ``t``'s rows go, in order, ``sent[r]`` of them to rank r; returns the rows
    every rank sent this one, ``received[s]`` from rank s, in rank order. Carries no gradient.
    Without a group (or with one rank) ``t`` itself is returned."""
    if not is_distributed() or world_size() == 1:
        return t
    t = t.detach().contiguous()
    out = t.new_empty((sum(received), *t.shape[1:]))
    dist.all_to_all_single(out, t, received, sent)
    return out


# --------------------------------------------------------------------------- local process groups


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (for a local process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_gloo(rank: int, world: int, port: int, timeout_s: float = 120) -> None:
    """A gloo process group over ``world`` processes of this machine, kept on loopback (the
    host name may resolve to an address that must not be used). Used by the benchmark and
    the multi-process tests; a hang past ``timeout_s`` becomes an error."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if names:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", names[0])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
