"""The optimiser and learning-rate schedule of a run, from its ``optim`` section."""

from __future__ import annotations

import torch

from rayssl.optim.lars import LARS, param_groups_for_lars
from rayssl.optim.schedule import scaled_lr, warmup_cosine
from rayssl.sections import OptimSection

__all__ = ["Schedule", "build_optimizer"]


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """LARS-wrapped SGD, SGD or AdamW over ``model``'s parameters; the lr is left to the schedule (0)."""
    if optim.optimizer == "lars":
        if optim.lars_exclude_bias_norm:
            groups = param_groups_for_lars(model, optim.weight_decay)
        else:  # like the official SwAV code: the trust ratio applies to every parameter
            groups = [{"params": list(model.parameters()), "weight_decay": optim.weight_decay}]
        return LARS(groups, lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay,
                    trust_coefficient=optim.lars_eta)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=optim.weight_decay, foreach=True)
    return torch.optim.SGD(model.parameters(), lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay,
                           foreach=True)


class Schedule:
    """Warmup + cosine over the whole run, in steps; the base lr scaled with the global batch."""

    def __init__(self, optim: OptimSection, batch_size: int, epochs: int, steps_per_epoch: int):
        self.total = max(1, epochs * steps_per_epoch)
        self.warmup = min(self.total, int(round(optim.warmup_epochs * steps_per_epoch)))
        self.base = scaled_lr(optim.base_lr, batch_size)
        self.final = self.base * optim.final_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total, self.warmup, self.base, self.final)
