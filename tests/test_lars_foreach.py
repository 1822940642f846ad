"""LARS's foreach step (the default) equals its per-tensor reference loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayssl.optim import LARS, param_groups_for_lars


@pytest.mark.parametrize("momentum,wd", [(0.9, 1e-4), (0.0, 0.0), (0.9, 0.0)])
def test_foreach_matches_the_per_tensor_loop(momentum, wd):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    fast = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        fast[3].bias.zero_()  # a zero weight takes the plain step on both paths
        ref[3].bias.zero_()
    opts = [LARS(param_groups_for_lars(m, wd), lr=0.5, momentum=momentum, weight_decay=wd,
                 trust_coefficient=0.02, foreach=fe) for m, fe in ((ref, False), (fast, True))]
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for step in range(4):
        for m, opt in zip((ref, fast), opts):
            opt.zero_grad()
            if step == 2:
                m[0].weight.requires_grad_(False)  # a parameter without gradient is skipped
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
    for a, b in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # And the parameters did move (the comparison is not between two frozen models).
    assert not torch.equal(fast[3].bias, torch.zeros(3))
