"""A rayssl checkpoint of a randomly initialised model, written by the real checkpoint writer.

Shared by the eval / export / viz tests: they read it through the same loading code users
run on trained checkpoints, without paying for a training run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rayssl.checkpoint import write_rank_state, write_shared_state
from rayssl.config import Config
from rayssl.methods import get_method


def write_random_checkpoint(directory, method: str = "swav", backbone: str = "resnet18",
                            small_stem: bool = False, crop_size: int = 32, seed: int = 0, **method_cfg):
    """Build ``method`` with random weights, save it as checkpoint ``directory``; return the model.

    For MLS/MoCo the momentum encoder is moved away from the online one, so a test can tell
    which of the two an export or picture used.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = Config.from_dict({
        "run": {"method": method, "num_workers": 1, "batch_size": 32},
        "model": {"backbone": backbone, "small_stem": small_stem},
        "data": {"crop_sizes": [crop_size, crop_size // 2], "crop_counts": [2, 2]},
        **({method: method_cfg} if method_cfg else {}),
    })
    torch.manual_seed(seed)
    model = get_method(method).model_cls(cfg.method, cfg.model, num_crops=4, world_size=1)
    if hasattr(model, "momentum_backbone"):
        with torch.no_grad():
            for p in model.momentum_backbone.parameters():
                p.add_(0.05 * torch.randn_like(p))
    # BatchNorm running statistics away from (0, 1), so a wrong buffer mapping shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    write_rank_state(d, 0, {"method": model.rank_state_dict(), "rng": None})
    write_shared_state(d, {"method": method, "model": model.state_dict(), "optimizer": {}, "epoch": 1, "step": 1,
                           "images_seen": 0, "world_size": 1, "config": cfg.to_dict()}, world_size=1)
    return model.eval()
