"""Optimisers and learning-rate schedules."""
from rayssl.optim.lars import LARS, param_groups_for_lars
from rayssl.optim.schedule import scaled_lr, warmup_cosine

__all__ = ["LARS", "param_groups_for_lars", "warmup_cosine", "scaled_lr"]
