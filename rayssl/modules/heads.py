"""Projection heads and SwAV prototypes (pure PyTorch)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProjectionMLP(nn.Module):
    """Linear-BN-ReLU-Linear projector, as in SwAV and MoCo-v2 (with BN, as SwAV uses).

    (B, in_dim) -> (B, out_dim), not normalised (callers L2-normalise).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batchnorm: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Prototypes(nn.Module):
    """K prototype vectors without bias (SwAV's C). scores = z . c_k for unit z and c_k.

    ``normalize_()`` re-projects the prototypes onto the unit sphere; SwAV calls it before
    every forward so that scores are cosine similarities in [-1, 1].
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.layer = nn.Linear(dim, num_prototypes, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight  # (K, dim)

    @torch.no_grad()
    def normalize_(self) -> None:
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1, p=2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim) unit vectors -> (B, K) scores."""
        return self.layer(z)
