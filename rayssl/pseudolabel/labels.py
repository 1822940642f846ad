"""CDUL's global-local pseudo-label initialisation as pure torch functions (no Ray, no CLIP).

Abdelfattah et al., "CDUL: CLIP-Driven Unsupervised Learning for Multi-Label Image
Classification", ICCV 2023 (arXiv:2307.16634), Sec. 3.1:

1. global similarity vector: CLIP scores the whole image against one prompt per class;
   ``S_global = softmax_c(logit_scale * cos(image, text_c))``. ``logit_scale`` is CLIP's
   temperature *multiplier* (``model.logit_scale.exp()``, about 100 for trained CLIPs):
   dividing by the stored log-scale instead (about 4.6) flattens the vector, a known bug
   of the public reproduction;
2. the image is cut into a ``grid x grid`` set of snippets, each scored the same way;
3. aggregation per class: the max over snippets when it reaches ``gamma``, else the min
   (``gamma = 0`` is max-pooling);
4. initial soft label ``(S_global + S_agg) / 2 + lam * |S_global - S_agg|``; ``lam = 0`` is
   the paper's average, ``lam = 1/2`` the element-wise max.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["class_prompts", "similarity_vector", "snippet_tiles", "aggregate_snippets", "initial_labels"]


def class_prompts(classes: list[str], template: str = "a photo of a {}") -> list[str]:
    """One prompt per class; ``template`` holds one ``{}`` for the class name."""
    if template.count("{}") != 1:
        raise ValueError(f"--template: needs exactly one '{{}}' for the class name, got {template!r}")
    return [template.format(c.replace("_", " ")) for c in classes]


def similarity_vector(image_features: torch.Tensor, text_features: torch.Tensor,
                      logit_scale: float | torch.Tensor) -> torch.Tensor:
    """Softmax over classes of ``logit_scale`` x cosine similarity.

    Args:
        image_features: (..., d) CLIP image embeddings (any norm; normalised here).
        text_features: (C, d) class prompt embeddings (normalised here).
        logit_scale: the multiplier, i.e. ``clip.logit_scale.exp()`` (not the stored log).
    Returns:
        (..., C) float32 rows summing to 1.
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    return torch.softmax(torch.as_tensor(logit_scale, dtype=torch.float32) * img @ txt.T, dim=-1)


def snippet_tiles(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Cut (B, 3, H, W) images into a ``grid x grid`` set of non-overlapping tiles.

    H and W must be multiples of ``grid``. Returns (B, grid*grid, 3, H/grid, W/grid),
    tiles in row-major order (top-left first).
    """
    b, c, h, w = images.shape
    if h % grid or w % grid:
        raise ValueError(f"image {h}x{w} is not divisible into a {grid}x{grid} grid")
    th, tw = h // grid, w // grid
    t = images.reshape(b, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(b, grid * grid, c, th, tw)


def aggregate_snippets(snippet_sims: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per class: max over snippets if that max is >= ``gamma``, else the min.

    Args:
        snippet_sims: (B, S, C) similarity vectors of the S snippets of each image.
    Returns:
        (B, C).
    """
    hi = snippet_sims.max(dim=1).values
    lo = snippet_sims.min(dim=1).values
    return torch.where(hi >= gamma, hi, lo)


def initial_labels(global_sims: torch.Tensor, aggregated: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """``(S_global + S_agg) / 2 + lam * |S_global - S_agg|``, clamped to [0, 1]. Shapes (B, C)."""
    out = 0.5 * (global_sims + aggregated) + lam * (global_sims - aggregated).abs()
    return out.clamp(0.0, 1.0)
