"""SwAV's swapped-prediction loss.

Caron et al. 2020, arXiv:2006.09882, Eq. (1)-(2) and Sec. 3.2 (multi-crop): the code of
each high-resolution crop is predicted from every other crop's prototype scores,
with cross-entropy against softmax(scores / temperature).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["swav_loss", "loss_at_uniform"]


def swav_loss(
    scores: Sequence[torch.Tensor],
    codes: Sequence[torch.Tensor],
    assign_crops: Sequence[int] = (0, 1),
    temperature: float = 0.1,
) -> torch.Tensor:
    """Swapped-prediction loss over multi-crop views.

    Args:
        scores: n_crops tensors of shape (B, K): prototype scores (cosine similarities)
            of each crop of the same B images, in crop order.
        codes: one (B, K) code tensor per entry of ``assign_crops`` (from
            :func:`~rayssl.losses.sinkhorn.sinkhorn_knopp`); treated as constants.
        assign_crops: indices of the crops whose codes are targets (the two
            high-resolution crops in the paper).
        temperature: softmax temperature tau (0.1 in the paper).

    Returns:
        Scalar: for each assigned crop i, the mean over every crop v != i of
        ``mean_b[-sum_k q_i[b, k] * log_softmax(scores_v[b] / tau)[k]]``, then the mean
        over the assigned crops. A value pinned at ln(K) means uniform predictions
        (see :func:`loss_at_uniform`).
    """
    n_crops = len(scores)
    if n_crops < 2:
        raise ValueError(f"swav_loss needs at least 2 crops, got {n_crops}")
    if len(codes) != len(assign_crops):
        raise ValueError(f"got {len(codes)} code tensors for {len(assign_crops)} assigned crops")
    if len(assign_crops) == 0:
        raise ValueError("swav_loss needs at least one assigned crop")
    if len(set(assign_crops)) != len(assign_crops) or not all(0 <= i < n_crops for i in assign_crops):
        raise ValueError(f"assign_crops {tuple(assign_crops)} must be distinct indices below n_crops={n_crops}")
    shape = scores[0].shape
    for s in list(scores) + list(codes):
        if s.shape != shape or s.dim() != 2:
            raise ValueError(f"all scores and codes must share one (B, K) shape, got {tuple(s.shape)} vs {tuple(shape)}")

    # float32 log-softmax: scores / 0.1 under fp16/bf16 autocast lose enough precision
    # to bias the loss, and log_softmax itself is the numerically sensitive step.
    log_probs = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]  # each (B, K)

    per_assigned = []
    for q, i in zip(codes, assign_crops):
        q = q.detach().float()  # targets: no gradient through the codes (paper, Sec. 3.1)
        terms = [-(q * log_probs[v]).sum(dim=1).mean() for v in range(n_crops) if v != i]
        per_assigned.append(torch.stack(terms).mean())
    return torch.stack(per_assigned).mean()


def loss_at_uniform(loss: float, num_prototypes: int, rel_tol: float = 0.01) -> bool:
    """Whether ``loss`` sits at ln(K), SwAV's known collapse mode.

    With uniform predictions softmax(scores / tau) = 1/K, the cross-entropy against any
    code distribution is exactly ln(K), so a swapped-prediction loss pinned there means
    the scores carry no information (typically identical embeddings or prototypes).

    Args:
        loss: the (scalar) loss value.
        num_prototypes: K.
        rel_tol: relative tolerance around ln(K).
    """
    if num_prototypes < 2:
        raise ValueError(f"num_prototypes must be >= 2, got {num_prototypes}")
    target = math.log(num_prototypes)
    return abs(float(loss) - target) <= rel_tol * target
