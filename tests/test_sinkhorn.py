"""Sinkhorn-Knopp codes, and the distributed helpers / queue in a real 2-process group."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rayssl import dist
from rayssl.losses import sinkhorn_knopp
from rayssl.modules.queue import FeatureQueue


def cosine_scores(batch: int, prototypes: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """(batch, prototypes) cosine similarities of random unit vectors, like SwAV's scores."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return z @ c.T


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Textbook Sinkhorn-Knopp in float64 without any stabilisation (fine for |scores| <= 1)."""
    q = torch.exp(scores.double() / epsilon).T  # (K, B)
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def prototype_imbalance(codes: torch.Tensor) -> float:
    """Largest relative deviation of a prototype's total mass from the ideal B/K."""
    b, k = codes.shape
    return ((codes.sum(dim=0) - b / k).abs().max() / (b / k)).item()


# --------------------------------------------------------------------------- single process


def test_rows_sum_to_one_and_float32():
    codes = sinkhorn_knopp(cosine_scores(64, 16))
    assert codes.shape == (64, 16)
    assert codes.dtype == torch.float32
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)


def test_prototype_marginals_approach_equipartition():
    scores = cosine_scores(64, 16, seed=0)
    softmax_only = torch.softmax(scores / 0.05, dim=1)  # what the codes would be without Sinkhorn
    imb = {it: prototype_imbalance(sinkhorn_knopp(scores, iterations=it)) for it in (1, 3, 10, 30)}
    # 3 iterations (SwAV's choice) leave a visible but bounded imbalance on these scores ...
    assert imb[3] < 0.4
    assert imb[3] < 0.5 * prototype_imbalance(softmax_only)
    # ... and more iterations converge towards exactly B/K per prototype.
    assert imb[30] < imb[10] < imb[3] < imb[1]
    assert imb[30] < 1e-3


def test_matches_float64_reference():
    for seed, (b, k, it) in enumerate([(8, 4, 3), (12, 5, 1), (20, 7, 10)]):
        scores = cosine_scores(b, k, dim=6, seed=seed)
        expected = reference_sinkhorn(scores, 0.05, it).float()
        torch.testing.assert_close(sinkhorn_knopp(scores, 0.05, it), expected, atol=1e-6, rtol=1e-5)
    # a different epsilon too (softer codes)
    scores = cosine_scores(10, 3, dim=4, seed=7)
    torch.testing.assert_close(
        sinkhorn_knopp(scores, 0.5, 3), reference_sinkhorn(scores, 0.5, 3).float(), atol=1e-6, rtol=1e-5
    )


def test_a_stack_solves_each_problem_as_if_alone():
    a, b = cosine_scores(24, 6, seed=1), cosine_scores(24, 6, seed=2)
    # The third problem is the first one shifted far down: its codes must be the first's
    # (Sinkhorn is shift-invariant), which only a per-problem stabilising max gives --
    # one max over the whole stack would underflow its exp() to zero.
    stack = torch.stack([a, b, a - 4.0])
    codes = sinkhorn_knopp(stack, 0.05, 3)
    assert codes.shape == (3, 24, 6) and codes.dtype == torch.float32
    for i, alone in enumerate((a, b, a)):
        torch.testing.assert_close(codes[i], sinkhorn_knopp(alone, 0.05, 3), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(codes[i], reference_sinkhorn(alone, 0.05, 3).float(), atol=1e-6, rtol=1e-5)


def test_extreme_scores_stay_finite():
    # exp(1 / 0.05) and exp(-1 / 0.05) span 17 orders of magnitude; a half-precision or
    # unshifted implementation overflows here.
    g = torch.Generator().manual_seed(1)
    signs = torch.randint(0, 2, (32, 10), generator=g).float() * 2 - 1
    for scores in (signs, torch.ones(32, 10), -torch.ones(32, 10)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            codes = sinkhorn_knopp(scores.to(dtype), epsilon=0.05)
            assert torch.isfinite(codes).all()
            torch.testing.assert_close(codes.sum(dim=1), torch.ones(32), atol=1e-5, rtol=0)
    # identical scores everywhere -> uniform codes
    torch.testing.assert_close(sinkhorn_knopp(torch.ones(32, 10)), torch.full((32, 10), 0.1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_equals_float32_call(dtype):
    scores = cosine_scores(48, 12).to(dtype)
    expected = sinkhorn_knopp(scores.float())
    codes = sinkhorn_knopp(scores)
    assert codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    assert torch.equal(codes, expected)


def test_autocast_is_disabled_inside(monkeypatch):
    scores = cosine_scores(48, 12)
    expected = sinkhorn_knopp(scores)

    # Spy on the exponential: it must see float32 input with autocast off, whatever the
    # caller's autocast state (on CPU the ops would not be downcast anyway, so the spy
    # is what makes this test able to fail).
    seen = []
    real_exp = torch.exp

    def spy_exp(x, *args, **kwargs):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return real_exp(x, *args, **kwargs)

    monkeypatch.setattr(torch, "exp", spy_exp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn_knopp(scores)
        codes_bf16_in = sinkhorn_knopp(scores.bfloat16())
    assert seen and all(d == torch.float32 and not on for d, on in seen), seen
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    assert torch.equal(codes, expected)
    assert torch.equal(codes_bf16_in, sinkhorn_knopp(scores.bfloat16().float()))


def test_no_gradient_and_input_untouched():
    scores = cosine_scores(16, 4).requires_grad_()
    before = scores.detach().clone()
    codes = sinkhorn_knopp(scores)
    assert not codes.requires_grad
    assert torch.equal(scores.detach(), before)


def test_non_finite_scores_raise():
    scores = cosine_scores(16, 4)
    scores[3, 2] = float("nan")
    with pytest.raises(ValueError, match="sinkhorn codes are not finite"):
        sinkhorn_knopp(scores)
    # one sample scored far below everything else: its column underflows to zero
    scores = cosine_scores(16, 4)
    scores[5] = -100.0
    with pytest.raises(ValueError, match="sinkhorn codes are not finite"):
        sinkhorn_knopp(scores)


def test_the_finiteness_check_is_on_where_it_costs_no_device_sync():
    """On the CPU (the default there) non-finite codes raise; off (the default on a GPU, where
    reading the answer would wait for the device mid-step) they come back non-finite, so the
    loss they enter is non-finite too and the training step's own check stops the run."""
    scores = cosine_scores(16, 4)
    scores[3, 2] = float("nan")
    with pytest.raises(ValueError, match="sinkhorn codes are not finite"):
        sinkhorn_knopp(scores, check_finite=True)
    codes = sinkhorn_knopp(scores, check_finite=False)
    assert not torch.isfinite(codes).all()
    loss = -(codes * torch.log_softmax(cosine_scores(16, 4) / 0.1, dim=1)).sum(dim=1).mean()
    assert not torch.isfinite(loss)
    good = cosine_scores(16, 4)
    torch.testing.assert_close(sinkhorn_knopp(good, check_finite=False), sinkhorn_knopp(good))


def test_bad_arguments():
    with pytest.raises(ValueError, match="expects \\(batch, prototypes\\) scores"):
        sinkhorn_knopp(torch.zeros(4))
    with pytest.raises(ValueError, match="got shape \\(2, 2, 4, 3\\)"):
        sinkhorn_knopp(torch.zeros(2, 2, 4, 3))
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(4, 3), epsilon=0)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(4, 3), iterations=0)


def test_dist_helpers_without_process_group():
    assert not dist.is_distributed()
    assert dist.world_size() == 1 and dist.rank() == 0
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_reduce_max_(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather_cat(t) is t
    assert dist.all_to_all_rows(t, [2], [2]) is t


# --------------------------------------------------------------------------- two processes

SPLITS = (10, 6)  # unequal on purpose: B_global must be all-reduced, not world_size * B_local
QUEUE_LENGTH = 10
QUEUE_DIMS = (3, 2)
QUEUE_STEPS = 3
KEYS_PER_RANK = 2


def _dist_scores() -> torch.Tensor:
    return cosine_scores(sum(SPLITS), 8, seed=3)


def _dist_stack() -> torch.Tensor:
    return torch.stack([_dist_scores(), cosine_scores(sum(SPLITS), 8, seed=4) * 0.5])


def _rank_keys(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys a rank enqueues at ``step``: distinct values that encode (rank, step, row)."""
    base = 100 * step + 10 * rank + torch.arange(KEYS_PER_RANK, dtype=torch.float32)
    return base[:, None].repeat(1, QUEUE_DIMS[0]), -base[:, None].repeat(1, QUEUE_DIMS[1])


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_local_gloo(rank, world, port, timeout_s=60)  # a hang becomes an error, not a stuck test
    try:
        out = {"is_distributed": dist.is_distributed(), "world": dist.world_size(), "rank": dist.rank()}

        start = sum(SPLITS[:rank])
        local = _dist_scores()[start : start + SPLITS[rank]]
        out["codes"] = sinkhorn_knopp(local, epsilon=0.05, iterations=3)
        out["codes_10"] = sinkhorn_knopp(local, epsilon=0.05, iterations=10)
        # Two problems at once (SwAV's two code crops), each split unevenly over the ranks.
        out["codes_stack"] = sinkhorn_knopp(_dist_stack()[:, start : start + SPLITS[rank]])

        # Only rank 1 has a sample whose column underflows; with one iteration the NaN
        # never reaches rank 0 through the all-reduced row sums, so only the collective
        # finiteness check makes rank 0 raise too (instead of running on and hanging).
        bad = local.clone()
        if rank == 1:
            bad[0] = -100.0
        try:
            sinkhorn_knopp(bad, iterations=1)
            out["raised"] = False
        except ValueError:
            out["raised"] = True

        queue = FeatureQueue(QUEUE_LENGTH, QUEUE_DIMS)
        for step in range(QUEUE_STEPS):
            queue.enqueue(*_rank_keys(rank, step), gather=True)
        out["queue"] = {k: v.clone() for k, v in queue.state_dict().items()}

        out["sum"] = dist.all_reduce_sum_(torch.tensor([rank + 1.0, 10.0]))
        out["max"] = dist.all_reduce_max_(torch.tensor([float(rank), -float(rank)]))
        out["gather"] = dist.all_gather_cat(torch.full((2, 3), float(rank)))
        # Rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 3 to rank 0 and none to itself.
        rows = torch.arange(3.0).reshape(3, 1) + 10 * rank
        out["all_to_all"] = dist.all_to_all_rows(rows, [1, 2] if rank == 0 else [3, 0],
                                                 [1, 3] if rank == 0 else [2, 0])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_dist_worker, args=(2, dist.free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def test_distributed_sinkhorn_equals_single_process(dist_results):
    scores = _dist_scores()
    for key, iterations in (("codes", 3), ("codes_10", 10)):
        whole = sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations)
        parts = [dist_results[r][key] for r in range(2)]
        assert [p.shape[0] for p in parts] == list(SPLITS)
        torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([r["codes_stack"] for r in dist_results], dim=1),
                               sinkhorn_knopp(_dist_stack()), atol=1e-6, rtol=0)
    # A per-rank (non-distributed) computation is genuinely different, so the equality
    # above is evidence of the all-reduces, not a coincidence.
    naive = torch.cat([sinkhorn_knopp(scores[:10]), sinkhorn_knopp(scores[10:])])
    assert (naive - sinkhorn_knopp(scores)).abs().max() > 1e-3


def test_distributed_non_finite_raises_on_every_rank(dist_results):
    assert [r["raised"] for r in dist_results] == [True, True]


def test_distributed_queue_identical_and_rank_ordered(dist_results):
    expected = FeatureQueue(QUEUE_LENGTH, QUEUE_DIMS)
    for step in range(QUEUE_STEPS):
        # what gather=True must produce: rank 0's rows, then rank 1's
        keys = [_rank_keys(r, step) for r in range(2)]
        expected.enqueue(*(torch.cat([k[f] for k in keys]) for f in range(len(QUEUE_DIMS))))
    q0, q1 = dist_results[0]["queue"], dist_results[1]["queue"]
    assert q0.keys() == q1.keys() == expected.state_dict().keys()
    for name, value in expected.state_dict().items():
        assert torch.equal(q0[name], q1[name]), name
        assert torch.equal(q0[name], value), name
    # newest first: step 2 rank 0 row 0, step 2 rank 0 row 1, step 2 rank 1 row 0, ...
    assert q0["field_0"][:, 0].tolist() == [200, 201, 210, 211, 100, 101, 110, 111, 0, 1]
    assert int(q0["filled"]) == QUEUE_LENGTH


def test_distributed_helpers(dist_results):
    for r, res in enumerate(dist_results):
        assert res["is_distributed"] and res["world"] == 2 and res["rank"] == r
        assert res["sum"].tolist() == [3.0, 20.0]
        assert res["max"].tolist() == [1.0, 0.0]
        assert torch.equal(res["gather"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
    assert dist_results[0]["all_to_all"].reshape(-1).tolist() == [0.0, 10.0, 11.0, 12.0]
    assert dist_results[1]["all_to_all"].reshape(-1).tolist() == [1.0, 2.0]
