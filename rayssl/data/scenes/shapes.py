"""The scenes' vocabulary: the shape classes, their outlines, and the object colours."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["COLOURS", "COLOUR_JITTER", "COLOUR_NAMES", "MAX_TILT", "POLYGONS", "RING_INNER", "SHAPES",
           "SHAPE_INDEX", "UNIT_AREA", "circle_points"]

# --------------------------------------------------------------------------- shapes

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "crescent",
    "heart",
    "arrow",
    "hourglass",
    "tee",
)
SHAPE_INDEX = {name: i for i, name in enumerate(SHAPES)}

# Named object colours (RGB). Each object gets a small per-channel jitter around its
# colour; the jitter is small enough that the name in the caption stays true.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 165, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 35),
    "orange": (245, 135, 25),
    "purple": (135, 45, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "cyan": (40, 205, 215),
    "pink": (245, 125, 190),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_JITTER = 12

def circle_points(n: int, r: float = 1.0, cx: float = 0.0, cy: float = 0.0,
                   start: float = 0.0, stop: float = 2 * math.pi) -> np.ndarray:
    t = np.linspace(start, stop, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    return circle_points(n, r, start=phase, stop=phase + 2 * math.pi)


def _star() -> np.ndarray:
    outer = _regular(5, 1.0)
    inner = _regular(5, 0.42, phase=-math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _crescent() -> np.ndarray:
    # Outer disc (radius 1 at the origin) minus an inner disc (radius r at (d, 0)):
    # walk the outer arc that lies outside the inner disc, then back along the inner
    # arc. The cut is thick enough (0.6 at the widest) to survive 32 px.
    d, r = 0.45, 0.85
    x = (d * d + 1 - r * r) / (2 * d)
    y = math.sqrt(1 - x * x)
    a0 = math.atan2(y, x)
    b0 = math.atan2(y, x - d)
    outer = np.stack([np.cos(t := np.linspace(a0, 2 * math.pi - a0, 40)), np.sin(t)], 1)
    t = np.linspace(2 * math.pi - b0, b0, 30)
    inner = np.stack([d + r * np.cos(t), r * np.sin(t)], 1)
    pts = np.concatenate([outer, inner])
    return pts - [(pts[:, 0].max() + pts[:, 0].min()) / 2, 0.0]  # centre the bbox


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


# Unit outlines, bounding radius about 1, image convention (y grows downwards).
# "circle" and "ring" are drawn as ellipses and have no polygon.
RING_INNER = 0.58
POLYGONS: dict[str, np.ndarray] = {
    "square": _regular(4, 1.0, phase=math.pi / 4),
    "triangle": _regular(3, 1.0) + [0.0, 0.2],  # centroid -> bbox centre
    "star": _star(),
    "cross": np.array([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                       (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3),
                       (-0.3, -0.3)], dtype=float) * 0.95,
    # A rhombus, not a rotated square: with random rotation only the aspect ratio
    # keeps "diamond" apart from "square".
    "diamond": np.array([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)], dtype=float),
    "crescent": _crescent(),
    "heart": _heart(),
    "arrow": np.array([(-1, -0.22), (0.1, -0.22), (0.1, -0.62), (1, 0), (0.1, 0.62),
                       (0.1, 0.22), (-1, 0.22)], dtype=float),
    "hourglass": np.array([(-0.72, -0.95), (0.72, -0.95), (0.13, 0), (0.72, 0.95),
                           (-0.72, 0.95), (-0.13, 0)], dtype=float),
    "tee": np.array([(-0.9, -0.85), (0.9, -0.85), (0.9, -0.4), (0.27, -0.4), (0.27, 0.95),
                     (-0.27, 0.95), (-0.27, -0.4), (-0.9, -0.4)], dtype=float),
}
UNIT_AREA: dict[str, float] = {name: _polygon_area(p) for name, p in POLYGONS.items()}
UNIT_AREA["circle"] = math.pi
UNIT_AREA["ring"] = math.pi * (1 - RING_INNER**2)
assert set(UNIT_AREA) == set(SHAPES)
# Shapes whose upside-down version reads as something else (a heart becomes a spade)
# only get a moderate tilt; all others rotate freely.
MAX_TILT = {"heart": math.pi / 4}
