"""SwAV swapped-prediction loss: value, gradients, learning, and the ln(K) collapse check."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rayssl.losses import loss_at_uniform, sinkhorn_knopp, swav_loss


def loop_loss(scores, codes, assign_crops, temperature):
    """Per-sample, per-class loop in float64 written straight from the paper's Eq. (2)."""
    n_crops = len(scores)
    batch, k = scores[0].shape
    total = 0.0
    for q, i in zip(codes, assign_crops):
        per_crop = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            for b in range(batch):
                logits = [float(scores[v][b, j]) / temperature for j in range(k)]
                log_norm = math.log(sum(math.exp(x) for x in logits))
                per_crop += -sum(float(q[b, j]) * (logits[j] - log_norm) for j in range(k)) / batch
        total += per_crop / (n_crops - 1)
    return total / len(assign_crops)


def random_case(batch=6, k=5, n_crops=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randn(batch, k, generator=g).clamp(-1, 1) for _ in range(n_crops)]
    codes = [torch.softmax(torch.randn(batch, k, generator=g), dim=1) for _ in range(2)]
    return scores, codes


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_matches_per_sample_loop(temperature):
    # 2 large + 3 small crops; codes for the two large ones
    scores, codes = random_case()
    got = swav_loss(scores, codes, assign_crops=(0, 1), temperature=temperature)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(loop_loss(scores, codes, (0, 1), temperature), rel=1e-5)


def test_assign_crops_other_than_first_two():
    scores, codes = random_case(seed=1)
    got = swav_loss(scores, codes, assign_crops=(3, 1), temperature=0.1)
    assert got.item() == pytest.approx(loop_loss(scores, codes, (3, 1), 0.1), rel=1e-5)
    # and it does depend on which crops the codes belong to
    assert abs(got.item() - swav_loss(scores, codes, (0, 1)).item()) > 1e-3


def test_low_precision_scores_use_float32_log_softmax():
    scores, codes = random_case(seed=2)
    half = [s.bfloat16() for s in scores]
    got = swav_loss(half, codes)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loop_loss([s.float() for s in half], codes, (0, 1), 0.1), rel=1e-5)


def test_gradient_flows_to_every_crop_and_not_to_codes():
    scores, codes = random_case(seed=3)
    scores = [s.requires_grad_() for s in scores]
    codes = [c.requires_grad_() for c in codes]
    swav_loss(scores, codes).backward()
    for s in scores:  # crop 0 is predicted for crop 1's code and vice versa; small crops for both
        assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(c.grad is None for c in codes)


def test_bad_arguments():
    scores, codes = random_case()
    with pytest.raises(ValueError):
        swav_loss(scores[:1], codes[:1], assign_crops=(0,))
    with pytest.raises(ValueError):
        swav_loss(scores, codes[:1], assign_crops=(0, 1))
    with pytest.raises(ValueError):
        swav_loss(scores, codes, assign_crops=(0, 9))
    with pytest.raises(ValueError):
        swav_loss(scores, [codes[0][:, :3], codes[1]])


def test_uniform_scores_give_ln_k():
    k = 16
    scores = [torch.full((8, k), 0.3) for _ in range(4)]  # identical embeddings: the collapse
    codes = [sinkhorn_knopp(scores[i]) for i in (0, 1)]
    loss = swav_loss(scores, codes).item()
    assert loss == pytest.approx(math.log(k), rel=1e-6)
    assert loss_at_uniform(loss, k)
    assert loss_at_uniform(math.log(k) * 1.005, k)
    assert not loss_at_uniform(math.log(k) * 1.02, k)
    assert not loss_at_uniform(math.log(k) * 0.98, k)
    with pytest.raises(ValueError):
        loss_at_uniform(0.0, 1)


def test_loss_falls_when_learning():
    torch.manual_seed(0)
    batch, in_dim, emb_dim, k = 32, 16, 8, 10
    images = torch.randn(batch, in_dim)
    # fixed "augmentations": 2 large crops with mild noise, 3 small crops with more
    crops = [images + 0.1 * torch.randn_like(images) for _ in range(2)]
    crops += [images + 0.3 * torch.randn_like(images) for _ in range(3)]

    encoder = nn.Linear(in_dim, emb_dim)
    prototypes = nn.Linear(emb_dim, k, bias=False)
    opt = torch.optim.SGD([*encoder.parameters(), *prototypes.parameters()], lr=0.5, momentum=0.9)

    losses = []
    for _ in range(30):
        with torch.no_grad():  # SwAV re-normalises the prototypes before every forward
            prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
        scores = [prototypes(F.normalize(encoder(c), dim=1)) for c in crops]
        codes = [sinkhorn_knopp(scores[i].detach()) for i in (0, 1)]
        loss = swav_loss(scores, codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.3 * losses[0], losses
    assert min(losses[-5:]) < math.log(k) * 0.9, losses
    assert not loss_at_uniform(losses[-1], k)
