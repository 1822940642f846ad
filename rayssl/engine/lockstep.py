"""Keep every rank taking the same number of steps without a device sync per step.

Each training step runs collectives (DDP's gradient all-reduce, Sinkhorn marginals, queue
all-gathers), so when one rank's data shard runs out first, the others must stop at the
same step or they wait forever in the next collective. Deciding that needs one small
collective per step; done on the training device (NCCL) and read with ``.item()``, it
makes the host wait for the whole queued step -- a GPU pipeline stall every step.

``lockstep`` decides on the host instead: the "I have a batch" flags go through a
separate gloo (CPU) process group, one step ahead -- the flag of batch t+1 is all-reduced
asynchronously while step t runs -- so the host never waits for the device and rarely
for the other ranks. All ranks stop at the first step for which some rank has no batch,
exactly as a blocking check would. Pure torch (no Ray).
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as tdist

from rayssl import dist

T = TypeVar("T")

__all__ = ["control_group", "lockstep"]


def control_group():
    """A gloo process group over all ranks for host-side control flags, or None.

    None without a process group (or with one rank): nothing to agree on. Collective:
    every rank must call it, in the same order relative to other group creations.
    """
    if not dist.is_distributed() or dist.world_size() == 1:
        return None
    # Its own group even when the default one is gloo: the flags then never interleave
    # with DDP's gradient all-reduces on one communicator.
    return tdist.new_group(backend="gloo")


def lockstep(batches: Iterable[T], group=None, limit: int | None = None) -> Iterator[T]:
    """Yield batches while *every* rank still has one (and at most ``limit``).

    ``group``: from :func:`control_group` (None: single process, batches pass through).
    Every rank must iterate collectively. Look-ahead of one batch: batch t+1 is fetched
    and its flag all-reduced (MIN, asynchronously, on CPU) before batch t is yielded, and
    the result is waited for only when batch t+1 is due.
    """
    it = iter(batches)
    if limit is not None and limit <= 0:
        return

    def fetch():
        nxt = next(it, None)
        flag = torch.tensor([0 if nxt is None else 1], dtype=torch.int32)
        work = None if group is None else tdist.all_reduce(flag, op=tdist.ReduceOp.MIN, group=group, async_op=True)
        return nxt, flag, work

    current, flag, work = fetch()
    taken = 0
    while True:
        if work is not None:
            work.wait()
        if int(flag[0]) < 1:
            return
        taken += 1
        last = limit is not None and taken >= limit
        if not last:
            nxt = fetch()  # the next flag travels while the caller runs this step
        yield current
        if last:
            return
        current, flag, work = nxt
