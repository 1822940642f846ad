"""Linear probes on frozen features (pure torch).

A single linear layer is trained on standardised frozen features, the usual way to
measure how linearly separable a self-supervised representation is: multi-label with
a per-class sigmoid + BCE (scored by macro mAP, as in MLS and CDUL), single-label
with softmax + cross-entropy (scored by top-1).

Features are standardised with the *training* mean and std (never test statistics,
which would leak). Weights start at zero -- the problem is convex, so no random
init is needed -- and the only randomness is the mini-batch order, drawn from a
private ``torch.Generator(seed)``: same inputs and seed, same result.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .metrics import mean_average_precision

__all__ = ["linear_probe_map", "linear_probe_top1"]


def _prepare(train_feats, test_feats) -> tuple[torch.Tensor, torch.Tensor]:
    x_tr = torch.as_tensor(train_feats).detach().float()
    x_te = torch.as_tensor(test_feats).detach().float().to(x_tr.device)
    if x_tr.dim() != 2 or x_te.dim() != 2 or x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"features must be (N, d) with equal d; got {tuple(x_tr.shape)} "
                         f"and {tuple(x_te.shape)}")
    if x_tr.shape[0] < 2:
        raise ValueError("a linear probe needs at least 2 training samples")
    mean = x_tr.mean(0, keepdim=True)
    # clamp: constant features would otherwise divide by zero (they become 0 anyway).
    std = x_tr.std(0, unbiased=False, keepdim=True).clamp_min(1e-6)
    return (x_tr - mean) / std, (x_te - mean) / std


# Below this many feature entries (N * d) a probe runs on one thread: its GEMMs are too
# small to gain from more, and on a busy machine (Ray workers next door) OpenMP
# threads waiting on each other made a 0.1 s probe take 2-4 s.
_SINGLE_THREAD_BELOW = 2**21


@contextlib.contextmanager
def _threads(work: int):
    before = torch.get_num_threads()
    if work >= _SINGLE_THREAD_BELOW or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(x: torch.Tensor, y: torch.Tensor, out_dim: int, loss_fn, epochs: int, lr: float,
         weight_decay: float, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam (``torch.optim.Adam``) on a zero-initialised linear layer; returns (weight (d, C), bias (C,))."""
    if epochs < 1 or lr <= 0 or weight_decay < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 1, lr > 0, weight_decay >= 0, batch_size >= 1; got "
                         f"{epochs}, {lr}, {weight_decay}, {batch_size}")
    w = torch.zeros(x.shape[1], out_dim, device=x.device, requires_grad=True)
    b = torch.zeros(out_dim, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    with torch.enable_grad(), _threads(x.numel()):
        for _ in range(epochs):
            # Full batch when it fits: no shuffling, fewer and better steps.
            order = torch.randperm(n, generator=gen).to(x.device) if n > batch_size else None
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size] if order is not None else slice(None)
                # The L2 penalty is on the weights only (not the bias) and part of the loss,
                # so weight_decay means the same whatever the lr.
                loss = loss_fn(x[rows] @ w + b, y[rows]) + 0.5 * weight_decay * w.pow(2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return w.detach(), b.detach()


def linear_probe_map(train_feats, train_targets, test_feats, test_targets, epochs: int = 100,
                     lr: float = 3e-2, weight_decay: float = 1e-3, batch_size: int = 4096,
                     seed: int = 0) -> float:
    """Multi-label linear probe: BCE-with-logits per class, scored by test macro mAP.

    Args:
        train_feats: (N_train, d) float, frozen features.
        train_targets: (N_train, C) {0, 1} multi-hot.
        test_feats: (N_test, d) float.
        test_targets: (N_test, C) {0, 1}.
        epochs: passes over the training set (one Adam step per batch).
        lr: Adam learning rate.
        weight_decay: L2 penalty coefficient on the weights.
        batch_size: full-batch training when N_train <= batch_size.
        seed: seeds the mini-batch order.
    Returns:
        Macro mAP in [0, 1] over test classes that have a positive.
    """
    x_tr, x_te = _prepare(train_feats, test_feats)
    y_tr = torch.as_tensor(train_targets).float().to(x_tr.device)
    y_te = torch.as_tensor(test_targets)
    if y_tr.dim() != 2 or y_tr.shape[0] != x_tr.shape[0]:
        raise ValueError(f"train_targets must be ({x_tr.shape[0]}, C), got {tuple(y_tr.shape)}")
    if y_te.shape != (x_te.shape[0], y_tr.shape[1]):
        raise ValueError(f"test_targets must be ({x_te.shape[0]}, {y_tr.shape[1]}), "
                         f"got {tuple(y_te.shape)}")
    w, b = _fit(x_tr, y_tr, y_tr.shape[1], F.binary_cross_entropy_with_logits, epochs, lr,
                weight_decay, batch_size, seed)
    return mean_average_precision((x_te @ w + b).cpu(), y_te.cpu())


def linear_probe_top1(train_feats, train_labels, test_feats, test_labels, epochs: int = 100,
                      lr: float = 3e-2, weight_decay: float = 1e-3, batch_size: int = 4096,
                      seed: int = 0, num_classes: int | None = None) -> float:
    """Single-label linear probe: softmax + cross-entropy, scored by test top-1.

    Args:
        train_feats: (N_train, d) float, frozen features.
        train_labels: (N_train,) int64.
        test_feats: (N_test, d) float.
        test_labels: (N_test,) int64.
        num_classes: defaults to 1 + the largest label in train or test.
        epochs, lr, weight_decay, batch_size, seed: as in ``linear_probe_map``.
    Returns:
        Top-1 accuracy in [0, 1].
    """
    x_tr, x_te = _prepare(train_feats, test_feats)
    y_tr = torch.as_tensor(train_labels).long().to(x_tr.device)
    y_te = torch.as_tensor(test_labels).long()
    if y_tr.shape != (x_tr.shape[0],) or y_te.shape != (x_te.shape[0],):
        raise ValueError(f"labels must be 1-D and match the features: got {tuple(y_tr.shape)} "
                         f"for {x_tr.shape[0]} and {tuple(y_te.shape)} for {x_te.shape[0]}")
    if y_te.numel() == 0:
        raise ValueError("linear_probe_top1 needs at least one test sample")
    if num_classes is None:
        num_classes = int(max(y_tr.max(), y_te.max())) + 1
    if int(y_tr.min()) < 0 or int(y_tr.max()) >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes})")
    w, b = _fit(x_tr, y_tr, num_classes, F.cross_entropy, epochs, lr, weight_decay,
                batch_size, seed)
    pred = (x_te @ w + b).argmax(1).cpu()
    return float((pred == y_te.cpu()).double().mean())
