"""mls_loss, its pseudo-labels and infonce_loss against loop-based float64 references.

The references below share nothing with the implementations: Python loops, ``math``,
and an explicit (similarity, index) ranking for the top-k with ties.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rayssl.losses import infonce_loss, mls_loss, mls_pseudo_labels


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def dyadic_units() -> torch.Tensor:
    """24 unit vectors in R^4 whose pairwise dot products are exact in float32.

    The 8 signed one-hot vectors and the 16 vectors (+-1/2, +-1/2, +-1/2, +-1/2): every dot
    product is a multiple of 1/4, so equal similarities are bit-for-bit equal whatever
    order the matrix product sums in; that is what makes real ties.
    """
    rows = [s * torch.eye(4)[i] for i in range(4) for s in (1.0, -1.0)]
    rows += [torch.tensor(signs) * 0.5 for signs in itertools.product((1.0, -1.0), repeat=4)]
    return torch.stack(rows)


def ref_labels(g: torch.Tensor, qg: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by (similarity descending, queue index ascending): the documented tie rule."""
    out = torch.zeros(g.shape[0], qg.shape[0], dtype=torch.float64)
    for b in range(g.shape[0]):
        sims = [sum(float(g[b, c]) * float(qg[j, c]) for c in range(g.shape[1])) for j in range(qg.shape[0])]
        ranked = sorted(range(len(sims)), key=lambda j: (-sims[j], j))
        for j in ranked[:k]:
            out[b, j] = 1.0
    return out


def ref_mls(g, z, qg, qz, k, tau) -> float:
    y = ref_labels(g, qg, k)
    total, n = 0.0, 0
    for b in range(z.shape[0]):
        for j in range(qz.shape[0]):
            p = sum(float(z[b, c]) * float(qz[j, c]) for c in range(z.shape[1])) / tau
            s = 1.0 / (1.0 + math.exp(-p))
            total += -(float(y[b, j]) * math.log(s) + (1.0 - float(y[b, j])) * math.log(1.0 - s))
            n += 1
    return total / n


def ref_infonce(q, k, queue, tau) -> float:
    total = 0.0
    for b in range(q.shape[0]):
        logits = [sum(float(q[b, c]) * float(k[b, c]) for c in range(q.shape[1])) / tau]
        logits += [sum(float(q[b, c]) * float(queue[j, c]) for c in range(q.shape[1])) / tau
                   for j in range(queue.shape[0])]
        total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    return total / q.shape[0]


# --------------------------------------------------------------------------- pseudo-labels


def test_labels_ties_lower_index_wins_exactly_k():
    h = 0.5
    g = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    qg = torch.tensor([
        [h, h, h, h],      # 0: 0.5
        [1.0, 0, 0, 0],    # 1: 1
        [0, 1.0, 0, 0],    # 2: 0
        [1.0, 0, 0, 0],    # 3: 1
        [h, -h, h, h],     # 4: 0.5
        [1.0, 0, 0, 0],    # 5: 1
        [-1.0, 0, 0, 0],   # 6: -1
    ])
    positives = {k: mls_pseudo_labels(g, qg, k)[0].nonzero().flatten().tolist() for k in range(1, 7)}
    assert positives[1] == [1]
    assert positives[2] == [1, 3]          # three-way tie at 1.0: the two lowest indices
    assert positives[3] == [1, 3, 5]
    assert positives[4] == [0, 1, 3, 5]    # tie at 0.5 for the 4th place: index 0 beats 4
    assert positives[5] == [0, 1, 3, 4, 5]
    assert positives[6] == [0, 1, 2, 3, 4, 5]  # k = D - 1: only the least similar is negative


def test_labels_match_reference_with_many_ties():
    pool = dyadic_units()
    gen = torch.Generator().manual_seed(0)
    qg = pool[torch.randint(0, len(pool), (40,), generator=gen)]  # many duplicates -> ties
    g = pool[torch.randint(0, len(pool), (6,), generator=gen)]
    for k in (1, 5, 13, 20, 39):
        labels = mls_pseudo_labels(g, qg, k)
        assert labels.dtype == torch.float32 and labels.shape == (6, 40)
        assert torch.equal(labels.sum(dim=1), torch.full((6,), float(k)))
        assert torch.equal(labels.double(), ref_labels(g, qg, k)), k


def test_labels_have_no_gradient():
    g = unit(3, 4, 0).requires_grad_()
    labels = mls_pseudo_labels(g, unit(8, 4, 1), 2)
    assert not labels.requires_grad


# --------------------------------------------------------------------------- mls_loss


@pytest.mark.parametrize("seed,b,d,dg,dz,k,tau", [
    (0, 3, 10, 5, 4, 3, 0.2),
    (1, 4, 7, 6, 3, 1, 0.5),
    (2, 2, 9, 4, 5, 8, 0.1),  # k = D - 1
])
def test_mls_loss_matches_reference(seed, b, d, dg, dz, k, tau):
    g, z = unit(b, dg, seed), unit(b, dz, seed + 10)
    qg, qz = unit(d, dg, seed + 20), unit(d, dz, seed + 30)
    loss = mls_loss(g, z, qg, qz, k=k, temperature=tau)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_mls(g, z, qg, qz, k, tau), rel=1e-5)


def test_mls_loss_with_tied_queue_entries():
    pool = dyadic_units()
    gen = torch.Generator().manual_seed(3)
    qg = pool[torch.randint(0, len(pool), (16,), generator=gen)]
    g = pool[torch.randint(0, len(pool), (5,), generator=gen)]
    z, qz = unit(5, 6, 4), unit(16, 6, 5)
    for k in (2, 7, 15):
        assert mls_loss(g, z, qg, qz, k=k).item() == pytest.approx(ref_mls(g, z, qg, qz, k, 0.2), rel=1e-5)


def test_mls_loss_is_plain_mean_over_all_entries():
    # No re-weighting of the k positives: with every logit 0, each entry costs ln 2
    # whatever its label, so the mean is ln 2 for any k.
    g, qg = unit(2, 4, 0), unit(12, 4, 1)
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    qz = torch.tensor([[0.0, 1.0]]).repeat(12, 1)
    for k in (1, 6, 11):
        assert mls_loss(g, z, qg, qz, k=k).item() == pytest.approx(math.log(2), rel=1e-6)


def test_mls_gradient_reaches_query_proj_only():
    g, z = unit(4, 5, 0).requires_grad_(), unit(4, 3, 1).requires_grad_()
    qg, qz = unit(9, 5, 2).requires_grad_(), unit(9, 3, 3).requires_grad_()
    mls_loss(g, z, qg, qz, k=3, temperature=0.2).backward()
    assert g.grad is None and qg.grad is None and qz.grad is None
    assert z.grad is not None

    # d/dz_b of mean BCE = sum_j (sigmoid(p_bj) - y_bj) qz_j / (tau * B * D), in float64
    y = ref_labels(g.detach(), qg.detach(), 3)
    p = z.detach().double() @ qz.detach().double().T / 0.2
    expected = (torch.sigmoid(p) - y) @ qz.detach().double() / (0.2 * 4 * 9)
    torch.testing.assert_close(z.grad.double(), expected, atol=1e-7, rtol=1e-5)


def test_mls_loss_float32_under_autocast_and_low_precision_inputs():
    g, z, qg, qz = unit(4, 8, 0), unit(4, 8, 1), unit(32, 8, 2), unit(32, 8, 3)
    expected = mls_loss(g, z, qg, qz, k=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = mls_loss(g, z, qg, qz, k=5)
    assert inside.dtype == torch.float32 and torch.equal(inside, expected)
    low = mls_loss(g.bfloat16(), z.bfloat16(), qg.bfloat16(), qz.bfloat16(), k=5)
    assert low.dtype == torch.float32


def test_mls_loss_bad_arguments():
    g, z, qg, qz = unit(3, 4, 0), unit(3, 2, 1), unit(6, 4, 2), unit(6, 2, 3)
    bad = [
        dict(query_backbone=g[0]),                 # not 2-D
        dict(query_proj=z[:2]),                    # batch sizes differ
        dict(queue_proj=qz[:5]),                   # queues not aligned (D differs)
        dict(queue_backbone=unit(6, 3, 4)),        # width of Q_g != width of g1
        dict(queue_proj=unit(6, 3, 4)),            # width of Q_z != width of z1
        dict(k=0),
        dict(k=6),                                 # k = D: no negative left
        dict(temperature=0.0),
    ]
    base = dict(query_backbone=g, query_proj=z, queue_backbone=qg, queue_proj=qz, k=2, temperature=0.2)
    for override in bad:
        with pytest.raises(ValueError):
            mls_loss(**{**base, **override})


# --------------------------------------------------------------------------- infonce_loss


@pytest.mark.parametrize("seed,b,d,dim,tau", [(0, 3, 8, 5, 0.2), (1, 5, 1, 3, 0.07), (2, 1, 16, 4, 1.0)])
def test_infonce_matches_reference(seed, b, d, dim, tau):
    q, k, queue = unit(b, dim, seed), unit(b, dim, seed + 1), unit(d, dim, seed + 2)
    loss = infonce_loss(q, k, queue, temperature=tau)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_infonce(q, k, queue, tau), rel=1e-5)


def test_infonce_gradient_only_to_queries_and_float32():
    q, k, queue = unit(4, 6, 0).requires_grad_(), unit(4, 6, 1).requires_grad_(), unit(10, 6, 2).requires_grad_()
    infonce_loss(q, k, queue).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = infonce_loss(q, k, queue)
    assert inside.dtype == torch.float32
    assert torch.equal(inside.detach(), infonce_loss(q.detach(), k.detach(), queue.detach()))
    assert infonce_loss(q.bfloat16(), k.bfloat16(), queue.bfloat16()).dtype == torch.float32


def test_infonce_bad_arguments():
    q = unit(3, 4, 0)
    with pytest.raises(ValueError):
        infonce_loss(q, q[:2], unit(5, 4, 1))
    with pytest.raises(ValueError):
        infonce_loss(q, q, unit(5, 3, 1))
    with pytest.raises(ValueError):
        infonce_loss(q[0], q[0], unit(5, 4, 1))
    with pytest.raises(ValueError):
        infonce_loss(q, q, unit(5, 4, 1), temperature=0)
