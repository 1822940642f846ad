"""LARS against hand-computed steps, the parameter split, and the LR schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rayssl.optim import LARS, param_groups_for_lars, scaled_lr, warmup_cosine

LR, MOMENTUM, WD, ETA = 0.5, 0.9, 0.1, 0.001


def two_steps(exclude: bool) -> torch.Tensor:
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    opt = LARS([{"params": [w], "lars_exclude": exclude}], lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)
    for g in ([1.0, 0.0], [0.0, 2.0]):
        w.grad = torch.tensor(g)
        opt.step()
    return w.detach()


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def test_lars_matches_hand_computation():
    w0, g1, g2 = [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]
    # step 1: ||w|| = 5, ||g|| = 1 -> trust = 0.001 * 5 / (1 + 0.1 * 5) = 1/300
    trust1 = ETA * 5.0 / (1.0 + WD * 5.0)
    assert trust1 == pytest.approx(1 / 300)
    u1 = [trust1 * (g + WD * w) for g, w in zip(g1, w0)]  # (1/300) * [1.3, 0.4]
    w1 = [w - LR * u for w, u in zip(w0, u1)]
    # step 2: new trust from the new weights; momentum buffer = 0.9 * u1 + u2
    trust2 = ETA * norm(w1) / (norm(g2) + WD * norm(w1))
    u2 = [trust2 * (g + WD * w) for g, w in zip(g2, w1)]
    buf = [MOMENTUM * a + b for a, b in zip(u1, u2)]
    w2 = [w - LR * b for w, b in zip(w1, buf)]

    w = torch.tensor(w0, requires_grad=True)
    opt = LARS([w], lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)
    w.grad = torch.tensor(g1)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor(w1), rtol=0, atol=1e-6)
    assert w.detach().tolist() == pytest.approx([3.0 - 0.5 * 1.3 / 300, 4.0 - 0.5 * 0.4 / 300], abs=1e-6)
    torch.testing.assert_close(two_steps(exclude=False), torch.tensor(w2), rtol=0, atol=1e-6)


def test_excluded_group_is_plain_sgd():
    # by hand: u1 = g1 + wd * w0 = [1.3, 0.4]; w1 = [2.35, 3.8]
    w1 = [3.0 - LR * 1.3, 4.0 - LR * 0.4]
    u2 = [0.0 + WD * w1[0], 2.0 + WD * w1[1]]
    w2 = [w - LR * (MOMENTUM * a + b) for w, a, b in zip(w1, [1.3, 0.4], u2)]
    got = two_steps(exclude=True)
    torch.testing.assert_close(got, torch.tensor(w2), rtol=0, atol=1e-6)

    # and identical to torch's own SGD with the same settings
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    sgd = torch.optim.SGD([w], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for g in ([1.0, 0.0], [0.0, 2.0]):
        w.grad = torch.tensor(g)
        sgd.step()
    torch.testing.assert_close(got, w.detach(), rtol=0, atol=1e-6)


def test_zero_weight_falls_back_to_plain_step():
    w = torch.zeros(3, requires_grad=True)
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0)
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.2, -0.05]))


def test_param_groups_for_lars():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    groups = param_groups_for_lars(model, weight_decay=1e-6)
    regular, excluded = groups
    assert {id(p) for p in regular["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)
    }
    assert regular["weight_decay"] == 1e-6 and not regular["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]
    # no empty group for a bias-free model
    assert len(param_groups_for_lars(nn.Linear(3, 3, bias=False), 0.1)) == 1


def test_lars_trains_tiny_regression():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) + 0.5
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = LARS(param_groups_for_lars(model, 1e-4), lr=0.5, momentum=0.9, trust_coefficient=0.02)
    losses = []
    for _ in range(100):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_lars_rejects_bad_hyperparameters():
    p = [torch.zeros(2, requires_grad=True)]
    for kwargs in ({"lr": -1}, {"lr": 0.1, "momentum": 1.0}, {"lr": 0.1, "weight_decay": -1}, {"lr": 0.1, "trust_coefficient": 0}):
        with pytest.raises(ValueError):
            LARS(p, **kwargs)


def test_warmup_cosine_shape():
    total, warmup, base, final, start = 100, 10, 1.0, 0.01, 0.1
    lrs = [warmup_cosine(s, total, warmup, base, final, start) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(start)
    assert lrs[5] == pytest.approx(start + 0.5 * (base - start))
    assert lrs[warmup] == pytest.approx(base)
    assert lrs[warmup + 45] == pytest.approx((base + final) / 2)  # cosine midpoint
    assert lrs[total] == pytest.approx(final)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # falling after
    assert warmup_cosine(10_000, total, warmup, base, final, start) == pytest.approx(final)
    # no warmup: starts at base
    assert warmup_cosine(0, 50, 0, 0.3) == pytest.approx(0.3)
    assert warmup_cosine(50, 50, 0, 0.3) == pytest.approx(0.0)
    # warmup spanning the whole run
    assert warmup_cosine(9, 10, 10, 1.0) == pytest.approx(0.9)
    assert warmup_cosine(10, 10, 10, 1.0, final_lr=0.2) == pytest.approx(0.2)
    for args in ((-1, 10, 2, 1.0), (0, 0, 0, 1.0), (0, 10, 11, 1.0)):
        with pytest.raises(ValueError):
            warmup_cosine(*args)


def test_scaled_lr():
    assert scaled_lr(0.6, 4096) == pytest.approx(9.6)
    assert scaled_lr(0.6, 256) == pytest.approx(0.6)
    assert scaled_lr(0.3, 64, reference_batch=128) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        scaled_lr(0.1, 0)


def test_adamw_is_built_with_decoupled_weight_decay():
    """optim.optimizer=adamw: torch's AdamW, lr left to the schedule, and its step matches
    the decoupled-decay formula on the first step (|update| = lr for a fresh Adam)."""
    from rayssl.config import OptimSection
    from rayssl.optim import build_optimizer

    w = nn.Parameter(torch.tensor([3.0, -4.0]))
    model = nn.Module()
    model.w = w
    opt = build_optimizer(model, OptimSection(optimizer="adamw", weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["lr"] == 0.0
    opt.param_groups[0]["lr"] = 0.01
    w.grad = torch.tensor([0.5, 2.0])
    opt.step()
    # decay first: w * (1 - lr * wd); then Adam's first step is lr * sign(g) (up to eps)
    expected = torch.tensor([3.0 * (1 - 0.001) - 0.01, -4.0 * (1 - 0.001) - 0.01])
    assert torch.allclose(w.detach(), expected, atol=1e-6)
