"""Learning-rate schedules: linear warmup + cosine decay, and the linear scaling rule.

SwAV (Caron et al. 2020, arXiv:2006.09882, Sec. 4.1 / App.) warms up linearly and then
decays with a cosine; the base rate scales linearly with the batch (Goyal et al. 2017,
arXiv:1706.02677).
"""
from __future__ import annotations

import math

__all__ = ["warmup_cosine", "scaled_lr"]


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    final_lr: float = 0.0,
    start_lr: float = 0.0,
) -> float:
    """Learning rate at ``step`` (0-based).

    Linear from ``start_lr`` at step 0 to ``base_lr`` at ``warmup_steps``, then a
    half cosine from ``base_lr`` down to ``final_lr`` at ``total_steps``; steps at or
    beyond ``total_steps`` return ``final_lr``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return final_lr
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * t))


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: ``base_lr * global_batch / reference_batch``."""
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be > 0, got global_batch={global_batch}, reference_batch={reference_batch}")
    return base_lr * global_batch / reference_batch
