"""Momentum (EMA) encoders, as in MoCo and MLS.

He et al. 2020 (MoCo, arXiv:1911.05722), Eq. (2): theta_k <- m theta_k + (1 - m) theta_q.
MLS (Zhu, Fu, Wu, ICCV 2023, arXiv:2308.03286) keeps MoCo-v2's momentum encoder with
m = 0.995 and fills both of its queues from it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["momentum_copy", "ema_update_"]


def momentum_copy(online: nn.Module) -> nn.Module:
    """A deep copy of ``online`` to serve as its momentum encoder.

    The copy starts with the online weights (MoCo initialises theta_k = theta_q) and its
    parameters have ``requires_grad=False``: it is updated only by :func:`ema_update_`, so
    no optimiser or DDP gradient bucket should ever touch it.
    """
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, m: float, copy_buffers: bool = True) -> None:
    """In place: ``param_t = m * param_t + (1 - m) * param_o`` for every parameter.

    Args:
        target: the momentum encoder (same architecture as ``online``).
        online: the encoder trained by the optimiser.
        m: momentum in [0, 1]; m = 0 copies the online weights, m = 1 freezes the target.
        copy_buffers: also copy every buffer (BatchNorm running statistics) from
            ``online``. The momentum encoder always runs in train mode, where BatchNorm
            uses the batch statistics, so its running statistics never enter training;
            copying them keeps them meaningful should anyone evaluate the momentum encoder.

    Raises:
        ValueError: if the two modules do not have the same parameter / buffer names and shapes.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    t_params, o_params = _paired(target.named_parameters(), online.named_parameters(), "parameter")
    if t_params:
        # Multi-tensor ops: one kernel launch for all tensors instead of one per parameter.
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1.0 - m)
    if copy_buffers:
        t_bufs, o_bufs = _paired(target.named_buffers(), online.named_buffers(), "buffer")
        for tb, ob in zip(t_bufs, o_bufs):
            tb.copy_(ob)


def _paired(target_items, online_items, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # torch.compile wraps a module as ``_orig_mod``; compiling only one of the two encoders
    # must not break the pairing of otherwise identical names.
    t = {n.replace("_orig_mod.", ""): v for n, v in target_items}
    o = {n.replace("_orig_mod.", ""): v for n, v in online_items}
    if t.keys() != o.keys():
        missing = sorted(set(o) ^ set(t))[:5]
        raise ValueError(f"momentum encoder and online encoder differ in {kind} names, e.g. {missing}")
    for name in t:
        if t[name].shape != o[name].shape:
            raise ValueError(f"{kind} {name!r}: momentum shape {tuple(t[name].shape)} != online {tuple(o[name].shape)}")
    names = list(t)
    return [t[n] for n in names], [o[n] for n in names]
