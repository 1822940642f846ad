"""Self-supervised losses (pure PyTorch, no Ray)."""
from rayssl.losses.sinkhorn import sinkhorn_knopp
from rayssl.losses.swav import loss_at_uniform, swav_loss

__all__ = ["sinkhorn_knopp", "swav_loss", "loss_at_uniform"]
