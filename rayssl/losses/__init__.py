"""Self-supervised losses (pure PyTorch, no Ray)."""
from rayssl.losses.infonce import infonce_loss
from rayssl.losses.mls import mls_loss, mls_pseudo_labels
from rayssl.losses.sinkhorn import sinkhorn_knopp
from rayssl.losses.swav import loss_at_uniform, swav_loss

__all__ = ["sinkhorn_knopp", "swav_loss", "loss_at_uniform", "infonce_loss", "mls_loss", "mls_pseudo_labels"]
