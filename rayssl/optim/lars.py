"""LARS: SGD with momentum and a layer-wise trust ratio.

You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks",
arXiv:1708.03888. SwAV (Caron et al. 2020, arXiv:2006.09882) trains with SGD wrapped in
apex's LARC with ``clip=False``, which is what this reproduces: per parameter tensor,

    g' = trust * (g + wd * w),   trust = eta * ||w|| / (||g|| + wd * ||w||)
    buf = momentum * buf + g'
    w  -= lr * buf

Groups flagged ``lars_exclude=True`` (biases, norm layers) take the plain SGD step
(``g' = g + wd * w``), the usual choice since their scale carries no layer-wise meaning.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["LARS", "param_groups_for_lars"]


class LARS(torch.optim.Optimizer):
    """SGD + momentum + weight decay with the LARS trust ratio.

    Args:
        params: parameters or parameter groups; a group may set ``lars_exclude=True``.
        lr: learning rate (use a schedule; SwAV scales it with the batch).
        momentum: heavy-ball momentum (0.9 in SwAV).
        weight_decay: L2 coefficient added to the gradient (1e-6 in SwAV).
        trust_coefficient: eta (0.001 in SwAV / LARC).
        eps: added to the trust-ratio denominator to avoid dividing by zero.
        foreach: update all tensors of a group with ``torch._foreach_*`` kernels (a few
            launches per group instead of ~10 per tensor: on GPUs the per-tensor loop is
            launch-bound). False: the reference per-tensor loop; same result.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        foreach: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)
        self.foreach = bool(foreach)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.foreach:
                self._group_step_foreach(group)
                continue
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                update = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    # A zero weight (fresh init) or zero gradient has no meaningful
                    # ratio: fall back to the plain step, as LARC does.
                    trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    update.mul_(trust)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = update.clone()
                    else:
                        buf.mul_(momentum).add_(update)
                    update = buf
                p.add_(update, alpha=-lr)
        return loss

    def _group_step_foreach(self, group: dict) -> None:
        """The per-tensor step above, for every tensor of ``group`` at once."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("LARS does not support sparse gradients")
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        updates = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else [g.clone() for g in grads]
        if not group["lars_exclude"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            trust = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
            torch._foreach_mul_(updates, list(trust.unbind(0)))
        if momentum != 0:
            old_bufs, old_updates, bufs = [], [], []
            for p, u in zip(params, updates):
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = u.clone()
                else:
                    old_bufs.append(buf)
                    old_updates.append(u)
                bufs.append(buf)
            if old_bufs:
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, old_updates)
            updates = bufs
        torch._foreach_add_(params, updates, alpha=-lr)


def param_groups_for_lars(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split ``model``'s parameters into a LARS group and an excluded group.

    Parameters with at most one dimension (biases, BatchNorm/LayerNorm weights) go in a
    group with ``lars_exclude=True`` and no weight decay; everything else gets
    ``weight_decay`` and the trust ratio. Parameters with ``requires_grad=False`` are
    kept too (the optimiser skips them while their grad is None), so unfreezing later,
    as SwAV does with its prototypes, needs no new optimiser. Empty groups are dropped.
    """
    regular, excluded = [], []
    for p in model.parameters():
        (excluded if p.ndim <= 1 else regular).append(p)
    groups = [
        {"params": regular, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]
