"""rayssl.lockstep: ranks with uneven data take the same number of steps, without hanging."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from rayssl.dist import free_port, init_local_gloo
from rayssl.engine.lockstep import control_group, lockstep

# (batches on rank 0, batches on rank 1, limit) -> every rank must take min(..., limit) steps.
CASES = [(5, 3, None), (3, 5, None), (4, 4, None), (6, 6, 2), (0, 3, None), (7, 2, 5)]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_local_gloo(rank, world, port, timeout_s=60)  # a hang becomes an error, not a stuck test
    try:
        control = control_group()
        results = []
        for case in CASES:
            mine, limit = case[rank], case[2]
            fetched = []

            def source(n=mine):
                for i in range(n):
                    fetched.append(i)
                    yield torch.full((2,), float(i))

            steps, sums = 0, []
            for batch in lockstep(source(), control, limit=limit):
                # A collective inside the step, as DDP / Sinkhorn do: it would hang if one
                # rank stopped while the other carried on.
                total = batch.clone()
                tdist.all_reduce(total)
                sums.append(float(total[0]))
                steps += 1
            results.append({"steps": steps, "sums": sums, "fetched": len(fetched)})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("lockstep")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_every_rank_takes_the_common_number_of_steps(results, i):
    a, b, limit = CASES[i]
    expected = min(a, b) if limit is None else min(a, b, limit)
    r0, r1 = results[0][i], results[1][i]
    assert r0["steps"] == r1["steps"] == expected
    # Step t ran on batch t of both ranks (no batch skipped or repeated by the look-ahead).
    assert r0["sums"] == r1["sums"] == [2.0 * t for t in range(expected)]
    # Look-ahead fetches at most one batch past the last step, never past the limit.
    for r, mine in ((r0, a), (r1, b)):
        assert r["fetched"] <= min(mine, expected + 1)
        if limit is not None:
            assert r["fetched"] <= limit


def test_single_process_passes_batches_through_and_honours_the_limit():
    assert control_group() is None  # no process group here
    assert list(lockstep(range(4), None)) == [0, 1, 2, 3]
    assert list(lockstep(range(4), None, limit=2)) == [0, 1]
    assert list(lockstep(range(4), None, limit=0)) == []
    assert list(lockstep([], None)) == []
