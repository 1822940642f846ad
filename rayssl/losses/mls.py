"""MLS's multi-label term: top-k pseudo-labels from the backbone queue, BCE on the projector queue.

Zhu, Fu, Wu, "Multi-Label Self-Supervised Learning with Scene Images", ICCV 2023,
arXiv:2308.03286, Sec. 3 and Fig. 2: the online backbone feature g1 of view 1 ranks the
queue Q_g of momentum backbone features; its k nearest entries are positives (y = 1), the
other D - k negatives (y = 0). The queue Q_z of momentum projector outputs, aligned slot
for slot with Q_g, acts as D binary classifiers for the online projection z1: p = z1 Q_z^T / tau.
The loss is the plain mean of binary cross-entropy over all D entries (no re-weighting of
the k positives against the D - k negatives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mls_loss", "mls_pseudo_labels"]


@torch.no_grad()
def mls_pseudo_labels(query_backbone: torch.Tensor, queue_backbone: torch.Tensor, k: int = 20) -> torch.Tensor:
    """Binary pseudo-labels: 1 on the k queue entries most similar to each query.

    Args:
        query_backbone: (B, d_g) L2-normalised online backbone features g1.
        queue_backbone: (D, d_g) L2-normalised queue Q_g.
        k: number of positives per query, 1 <= k < D.

    Returns:
        (B, D) float32 tensor of 0/1 with exactly ``k`` ones per row; no gradient.

    Ties: similarities are ranked with a *stable* descending sort, so among entries with
    equal similarity the lower queue index (the newer key; the queue is newest first)
    ranks first. Each row therefore always has exactly k positives, and which of several
    entries tied at the k-th place become positive is deterministic. ``torch.topk`` makes
    no such promise, which is why it is not used here; sorting D entries costs little next
    to the matrix product that produced them.
    """
    _check_k(k, queue_backbone.shape[0])
    with torch.autocast(device_type=query_backbone.device.type, enabled=False):
        # float32: bf16 would round distinct similarities into spurious ties.
        sims = query_backbone.detach().float() @ queue_backbone.detach().float().t()  # (B, D)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
        labels = torch.zeros_like(sims)
        labels.scatter_(1, order, 1.0)
    return labels


def mls_loss(
    query_backbone: torch.Tensor,
    query_proj: torch.Tensor,
    queue_backbone: torch.Tensor,
    queue_proj: torch.Tensor,
    k: int = 20,
    temperature: float = 0.2,
) -> torch.Tensor:
    """Mean binary cross-entropy of ``sigmoid(z1 Q_z^T / tau)`` against top-k pseudo-labels.

    Args:
        query_backbone: (B, d_g) L2-normalised online backbone features g1 (only used to
            rank the queue; no gradient flows through the labels).
        query_proj: (B, d_z) L2-normalised online projections z1; the gradient flows here.
        queue_backbone: (D, d_g) L2-normalised Q_g; constant.
        queue_proj: (D, d_z) L2-normalised Q_z, slot i describing the same key as
            ``queue_backbone[i]``; constant.
        k: positives per query (20 in the paper), 1 <= k < D.
        temperature: tau of the logits (0.2, the InfoNCE temperature).

    Returns:
        Scalar float32 ``mean_{b, i} BCEWithLogits(p[b, i], y[b, i])`` over all B x D
        entries, with ``y = mls_pseudo_labels(g1, Q_g, k)`` (see its tie rule) and
        ``p = z1 Q_z^T / tau``.

    Raises:
        ValueError: on mismatched shapes, k outside [1, D), or a non-positive temperature.
    """
    for name, t in (("query_backbone", query_backbone), ("query_proj", query_proj),
                    ("queue_backbone", queue_backbone), ("queue_proj", queue_proj)):
        if t.dim() != 2:
            raise ValueError(f"mls_loss: {name} must be 2-D, got shape {tuple(t.shape)}")
    if query_backbone.shape[0] != query_proj.shape[0]:
        raise ValueError(
            f"mls_loss: query_backbone {tuple(query_backbone.shape)} and query_proj {tuple(query_proj.shape)} "
            "must have the same batch size"
        )
    if queue_backbone.shape[0] != queue_proj.shape[0]:
        raise ValueError(
            f"mls_loss: queue_backbone {tuple(queue_backbone.shape)} and queue_proj {tuple(queue_proj.shape)} "
            "must have the same number of entries D (the two queues are aligned slot for slot)"
        )
    if queue_backbone.shape[1] != query_backbone.shape[1]:
        raise ValueError(
            f"mls_loss: queue_backbone {tuple(queue_backbone.shape)} does not match the width of "
            f"query_backbone {tuple(query_backbone.shape)}"
        )
    if queue_proj.shape[1] != query_proj.shape[1]:
        raise ValueError(
            f"mls_loss: queue_proj {tuple(queue_proj.shape)} does not match the width of "
            f"query_proj {tuple(query_proj.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"mls_loss: temperature must be > 0, got {temperature}")

    y = mls_pseudo_labels(query_backbone, queue_backbone, k)  # (B, D), checks k
    # float32: p reaches +-1/tau = +-5 and the mean runs over B * D terms.
    with torch.autocast(device_type=query_proj.device.type, enabled=False):
        p = query_proj.float() @ queue_proj.detach().float().t() / temperature  # (B, D)
        return F.binary_cross_entropy_with_logits(p, y, reduction="mean")


def _check_k(k: int, d: int) -> None:
    # k = D would make every entry positive: the term would only pull z1 towards the
    # whole queue, which carries no information.
    if not 1 <= k < d:
        raise ValueError(f"mls top-k needs 1 <= k < D (at least one negative); got k={k}, D={d}")
