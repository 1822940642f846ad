"""Sinkhorn-Knopp equipartition of a batch over prototypes (SwAV's online codes).

Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", arXiv:2006.09882, Sec. 3.1 and Alg. 1 / Appendix A.1: the codes Q solve an
entropy-regularised optimal transport problem whose solution is
``Diag(u) exp(C / eps) Diag(v)``; a few alternating row / column normalisations of
``exp(scores / eps)`` find ``u`` and ``v``.
"""
from __future__ import annotations

import torch

from rayssl import dist

__all__ = ["sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
                   check_finite: bool | None = None) -> torch.Tensor:
    """Soft cluster assignments (codes) for a batch, equipartitioned over prototypes.

    Args:
        scores: (B_local, K) prototype scores of this rank's samples (cosine
            similarities in SwAV), any floating dtype. No gradient flows through.
            A stack (C, B_local, K) solves C independent problems at once (SwAV's
            code crops) with the same number of collectives as one.
        epsilon: entropy regularisation; SwAV uses 0.05.
        iterations: number of Sinkhorn-Knopp iterations; SwAV uses 3.
        check_finite: raise when the codes are not finite (decided over all ranks, one more
            all-reduce). The answer is read on the host, which on a GPU waits for the GPU in
            the middle of every step; so by default (None) only where that costs nothing, on
            the CPU. Elsewhere non-finite codes make the loss non-finite, which the training
            step's own check stops (``rayssl.engine.checked_forward``, at log steps on a GPU).

    Returns:
        float32 codes of the shape of ``scores``; each row sums to 1 and, over the
        *global* batch, each prototype receives about B_global / K of the mass (per
        problem, for a stack).

    When a torch.distributed process group is initialised the prototype marginals,
    the normaliser and the batch size are all-reduced, so the codes of a batch split
    over ranks (even unevenly) equal the codes of the whole batch on one process.
    Every rank must call this collectively, with the same number of problems. Per
    call: 2 + ``iterations`` all-reduces, and one more with ``check_finite``, whatever the
    number of problems.

    Raises:
        ValueError: if ``scores`` is not 2-D or 3-D, or (``check_finite``) the codes are not finite.
    """
    if scores.dim() not in (2, 3):
        raise ValueError("sinkhorn_knopp expects (batch, prototypes) scores or a (problems, batch, "
                         f"prototypes) stack, got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        # Only the final column normalisation makes each code sum to 1.
        raise ValueError(f"sinkhorn iterations must be >= 1, got {iterations}")

    # exp(1 / 0.05) ~ 4.9e8 overflows fp16 and loses everything in bf16: whatever the
    # caller's autocast state, this runs in float32.
    with torch.autocast(device_type=scores.device.type, enabled=False):
        logits = scores.detach().float() / epsilon
        if scores.dim() == 2:
            logits = logits.unsqueeze(0)
        problems, b_local, num_prototypes = logits.shape  # (C, B_local, K)

        # Subtracting a constant from every logit of a problem multiplies its Q by a
        # constant, which the first normalisation removes; each problem's *global* max is
        # the same on every rank, so the distributed result stays the single-process one.
        if b_local > 0:
            shift = logits.amax(dim=(1, 2))
        else:  # a rank with an empty shard still joins the collectives
            shift = torch.full((problems,), float("-inf"), device=logits.device)
        dist.all_reduce_max_(shift)

        q = torch.exp(logits - shift[:, None, None]).transpose(1, 2)  # (C, K, B_local)

        # One all-reduce for the global batch size and every problem's total mass.
        sizes = torch.cat([q.new_full((1,), float(b_local)), q.sum(dim=(1, 2))])  # no host copy
        dist.all_reduce_sum_(sizes)
        batch, total = sizes[0], sizes[1:]
        q /= total[:, None, None]

        for _ in range(iterations):
            # Rows = prototypes: their mass is spread over all ranks' samples.
            row_sums = dist.all_reduce_sum_(q.sum(dim=2, keepdim=True))  # (C, K, 1)
            q /= row_sums
            q /= num_prototypes
            # Columns = samples: each lives on exactly one rank, so this stays local.
            q /= q.sum(dim=1, keepdim=True)  # (C, 1, B_local)
            q /= batch

        q *= batch  # each sample's code now sums to 1
        codes = q.transpose(1, 2)  # (C, B_local, K)

        if check_finite is None:
            check_finite = codes.device.type == "cpu"
        # Decide collectively so that no rank raises while another carries on into the
        # next collective and hangs.
        if check_finite and dist.all_reduce_max_((~torch.isfinite(codes)).any().float()).item() > 0:
            lo = scores.min().item() if scores.numel() else float("nan")
            hi = scores.max().item() if scores.numel() else float("nan")
            raise ValueError(
                "sinkhorn codes are not finite (on this or another rank): "
                f"epsilon={epsilon}, local score range [{lo:.4g}, {hi:.4g}], "
                f"K={num_prototypes}, B_local={b_local}. NaN/inf scores (missing L2 "
                "normalisation, fp16 overflow upstream) or scores spread over far more "
                "than ~80*epsilon make exp() underflow a whole row or column."
            )
    return codes if scores.dim() == 3 else codes[0]
