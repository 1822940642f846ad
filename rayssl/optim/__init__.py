"""Optimisers and learning-rate schedules."""
from rayssl.optim.build import Schedule, build_optimizer
from rayssl.optim.lars import LARS, param_groups_for_lars
from rayssl.optim.schedule import scaled_lr, warmup_cosine

__all__ = ["LARS", "Schedule", "build_optimizer", "param_groups_for_lars", "scaled_lr", "warmup_cosine"]
