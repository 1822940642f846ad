"""Ranking metrics for multi-label evaluation (pure torch).

Average precision (AP) here is the standard non-interpolated ("VOC 2010+ style")
AP: the mean, over the positives, of the precision at each positive's rank when the
samples are sorted by decreasing score.

Ties: samples with equal scores form one group, and every positive in a group gets
the precision measured at the *end* of its group (all tied samples counted). This is
the threshold-based definition scikit-learn's ``average_precision_score`` uses; it is
deterministic and, unlike breaking ties by position, does not depend on the order of
the input rows. Without ties it equals the per-rank definition above.
"""

from __future__ import annotations

import math

import torch

__all__ = ["average_precision", "mean_average_precision"]


def _as_2d(scores, targets) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(scores).detach()
    t = torch.as_tensor(targets).detach()
    if s.shape != t.shape:
        raise ValueError(f"scores {tuple(s.shape)} and targets {tuple(t.shape)} differ in shape")
    if s.dim() == 1:
        s, t = s[:, None], t[:, None]
    if s.dim() != 2:
        raise ValueError(f"expected (N,) or (N, C) inputs, got {tuple(s.shape)}")
    # float64: cumulative counts over large N stay exact, scores keep their order.
    s = s.to(torch.float64)
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    t = t.to(torch.float64)
    if not torch.all((t == 0) | (t == 1)):
        raise ValueError("targets must be 0/1")
    return s, t


def _per_class_ap(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP of each column; NaN for columns without a positive.

    Args:
        scores: (N, C) float64.
        targets: (N, C) float64 in {0, 1}.
    Returns:
        (C,) float64.
    """
    n = scores.shape[0]
    sorted_scores, order = torch.sort(scores, dim=0, descending=True, stable=True)
    hits = torch.gather(targets, 0, order)
    cum_hits = torch.cumsum(hits, dim=0)
    # Index of the last row of each tie group, for every row: mark group ends, then
    # take a reverse running minimum of their indices.
    rows = torch.arange(n, device=scores.device).unsqueeze(1).expand_as(sorted_scores)
    is_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    is_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    end_idx = torch.where(is_end, rows, torch.full_like(rows, n))
    end_idx = torch.flip(torch.cummin(torch.flip(end_idx, [0]), dim=0).values, [0])
    precision = torch.gather(cum_hits, 0, end_idx) / (end_idx + 1).to(torch.float64)
    n_pos = hits.sum(0)
    ap = (precision * hits).sum(0) / n_pos
    return torch.where(n_pos > 0, ap, torch.full_like(ap, math.nan))


def average_precision(scores, targets) -> float:
    """Non-interpolated AP of one class.

    Args:
        scores: (N,) float, higher = more likely positive.
        targets: (N,) {0, 1}.
    Returns:
        AP in [0, 1]; NaN when there is no positive (AP is undefined then).
    """
    s, t = _as_2d(scores, targets)
    if s.shape[1] != 1:
        raise ValueError("average_precision takes 1-D inputs; use mean_average_precision")
    return float(_per_class_ap(s, t)[0])


def mean_average_precision(scores, targets) -> float:
    """Macro mAP: the unweighted mean of per-class AP.

    Classes with no positive target are excluded from the mean: their AP is
    undefined, and counting them as 0 (or 1) would move the score for reasons that
    have nothing to do with the model. This matches the usual VOC/COCO multi-label
    protocol.

    Args:
        scores: (N, C) float.
        targets: (N, C) {0, 1}.
    Returns:
        mAP in [0, 1].
    Raises:
        ValueError: if no class has a positive (the mean would be empty).
    """
    s, t = _as_2d(scores, targets)
    ap = _per_class_ap(s, t)
    valid = ~torch.isnan(ap)
    if not valid.any():
        raise ValueError("no class has a positive target; mAP is undefined")
    return float(ap[valid].mean())
