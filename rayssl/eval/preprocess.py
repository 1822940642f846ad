"""Evaluation-time image preprocessing (pure numpy + Pillow, no Ray).

Frozen-feature evaluation sees each image once, without augmentation: the central square
of the image, resized to the size the backbone was trained on (bilinear, antialiased, in
one Pillow ``resize(box=...)`` call). Labels then map to the same pixels whatever the
aspect ratio, and every image becomes one fixed-size row.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): the central square crop, resized."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    if side == size and h == w:
        return np.ascontiguousarray(image)
    out = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR,
                                        box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


def label_matrix(labels: list[tuple[str, ...]], classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class-name tuples -> ((N, C) uint8 multi-hot, sorted class names)."""
    classes = classes if classes is not None else sorted({c for names in labels for c in names})
    index = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(labels), len(classes)), dtype=np.uint8)
    for r, names in enumerate(labels):
        for c in names:
            y[r, index[c]] = 1
    return y, classes


def split_train_test(ids: list[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``ids`` into (train rows, test rows), independent of the input order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction: must be in (0, 1), got {test_fraction}")
    order = np.argsort(np.asarray(ids, dtype=object).astype(str), kind="stable")
    perm = order[np.random.default_rng(seed).permutation(len(ids))]
    n_test = max(1, int(round(len(ids) * test_fraction)))
    if n_test >= len(ids):
        raise ValueError(f"--test-fraction: {len(ids)} labelled images are too few to split")
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
