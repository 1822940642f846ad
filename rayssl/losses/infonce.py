"""MoCo's InfoNCE loss against a queue of negative keys.

He et al. 2020 (MoCo, arXiv:1911.05722), Eq. (1) and Alg. 1; Chen et al. 2020 (MoCo-v2,
arXiv:2003.04297) keep the loss and set tau = 0.2. MLS (Zhu, Fu, Wu, ICCV 2023,
arXiv:2308.03286, Sec. 3) adds its multi-label term on top of this loss unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["infonce_loss"]


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE of each query against its own key (positive) and every queue entry (negatives).

    Args:
        q: (B, d) L2-normalised queries (online encoder, view 1); gradient flows into it.
        k: (B, d) L2-normalised keys (momentum encoder, view 2); treated as a constant
            (detached here, whatever the caller passes).
        queue: (D, d) L2-normalised negative keys; treated as a constant.
        temperature: tau (0.2 in MoCo-v2 and MLS).

    Returns:
        Scalar float32: ``mean_b CE([q_b.k_b, q_b.queue^T] / tau, target=0)``, i.e. the
        positive logit sits in column 0 of a (B, 1 + D) logit matrix.

    Raises:
        ValueError: on mismatched shapes or a non-positive temperature.
    """
    if q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"infonce_loss needs q and k of one (B, d) shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"infonce_loss needs a (D, {q.shape[1]}) queue, got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"infonce_loss temperature must be > 0, got {temperature}")

    # Logits of unit vectors divided by 0.2 reach +-5 and the softmax runs over 1 + 4096
    # columns: float32 whatever the caller's autocast state, so bf16 rounding does not
    # bias the loss.
    with torch.autocast(device_type=q.device.type, enabled=False):
        q32 = q.float()
        k32 = k.detach().float()
        neg = queue.detach().float()
        pos = (q32 * k32).sum(dim=1, keepdim=True)  # (B, 1)
        logits = torch.cat([pos, q32 @ neg.t()], dim=1) / temperature  # (B, 1 + D)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)
