"""The built-in "scenes" dataset: seeded, synthetic multi-object RGB images.

Each scene holds 1-4 coloured objects, each of a distinct class from ``SHAPES``,
drawn over a cluttered background (colour gradient, smooth colour noise and faint
strokes that belong to no class). A scene carries three kinds of ground truth:

* ``classes`` -- the set of shape classes present (multi-label evaluation, mAP);
* ``dominant`` -- the class of the largest object (single-label kNN / linear top-1);
* ``caption`` -- a short English description ("a red star and a blue ring") from
  which a tiny CLIP-like model can be trained in seconds (CDUL tests).

Generation is a pure function of ``(index, seed, size)``: the random stream comes
from ``np.random.default_rng([seed, index])`` and never from global state, so any
Ray worker, in any process and any order, produces byte-identical images. This is
what lets ``ray.data.range(n).map_batches(scenes_from_range_batch, ...)`` stand in
for a real image dataset without downloading anything.

The dominant object is guaranteed to be unambiguous and fully visible: its area is
at least ``_DOMINANCE`` times that of every other object and it is drawn last (on
top). The dominant class is drawn uniformly from ``SHAPES``, so single-label
evaluation is balanced.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from rayssl.data.scenes.shapes import (COLOUR_JITTER, COLOUR_NAMES, COLOURS, MAX_TILT, POLYGONS, RING_INNER,
                                       SHAPE_INDEX, SHAPES, UNIT_AREA)

__all__ = ["SPLITS", "Scene", "epoch_order", "generate_batch", "generate_scene", "scenes_from_range_batch", "split_seed"]

SPLITS: tuple[str, ...] = ("train", "eval-train", "eval-test")

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: cheap antialiasing
_MAX_OBJECTS = 4
_DOMINANCE = 1.5  # dominant area >= 1.5x any other object's area
_DOM_RADIUS = (0.18, 0.26)  # dominant bounding radius, as a fraction of the side
_OTHER_RADIUS = (0.09, 0.16)  # other objects' bounding radius, fraction of the side
_MIN_CONTRAST = 100.0  # RGB distance between an object and the background under it
_COARSE_FROM = 32  # resolution the contrast map is rendered at, whatever the size
_SEED_LIMIT = 2**32  # user seeds live below this; eval splits are derived above it


# --------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class Scene:
    """One generated scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        classes: sorted unique class names of the objects present (1-4 names).
        dominant: class of the object with the largest area; always in ``classes``.
        caption: e.g. "a red star, a green cross and a blue ring" (dominant first).
        dominant_place: the dominant object's centre x, centre y and bounding radius, as
            fractions of the side (for probes of what features encode besides shape).
    """

    image: np.ndarray
    classes: tuple[str, ...]
    dominant: str
    caption: str
    dominant_place: tuple[float, float, float]


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float  # centre and bounding radius in pixels of the supersampled canvas
    cy: float
    radius: float
    angle: float


def _check_args(index: int, seed: int, size: int) -> None:
    if int(index) < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 pixels (shapes are unreadable below), got {size}")


def _background(rng: np.random.Generator, size: int, side: int) -> tuple[Image.Image, np.ndarray]:
    """Muted gradient + smooth colour noise as an RGB canvas of ``side`` x ``side``.

    The field is smooth, so it is computed at the output ``size`` and upsampled to the
    supersampled ``side`` by PIL (16x cheaper than doing the float maths at ``side``).
    Also returns a coarse (8, 8, 3) float mean-colour map for the contrast checks; it
    is rendered at a fixed resolution so that colour choices, and hence captions, do
    not depend on ``size``.
    """
    # Two muted end colours: pulled halfway to their grey so that saturated objects
    # stand out, but the background still varies in hue and brightness per scene.
    ends = rng.uniform(40, 215, size=(2, 3))
    ends = (0.5 * ends + 0.5 * ends.mean(axis=1, keepdims=True)).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    # Smooth colour noise: a small random grid upsampled bicubically by PIL.
    cells = int(rng.integers(3, 7))
    noise = rng.normal(0, 22, size=(cells, cells, 3))
    noise_img = Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8))

    def render(res: int) -> Image.Image:
        g = np.linspace(-1, 1, res, dtype=np.float32)
        proj = math.cos(theta) * g[None, :] + math.sin(theta) * g[:, None]
        w = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
        bg = (1 - w) * ends[0] + w * ends[1]
        up = np.asarray(noise_img.resize((res, res), Image.BICUBIC), dtype=np.float32)
        return Image.fromarray(np.clip(bg + (up - 128.0), 0, 255).astype(np.uint8))

    small = render(size)
    coarse_src = small if size == _COARSE_FROM else render(_COARSE_FROM)
    coarse = np.asarray(coarse_src.resize((8, 8), Image.BOX), dtype=np.float64)
    return small.resize((side, side), Image.BILINEAR), coarse


def _local_colour(coarse: np.ndarray, side: int, cx: float, cy: float, r: float) -> np.ndarray:
    cell = side / coarse.shape[0]
    x0, x1 = int(max(cx - r, 0) // cell), int(min(cx + r, side - 1) // cell)
    y0, y1 = int(max(cy - r, 0) // cell), int(min(cy + r, side - 1) // cell)
    return coarse[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, side: int,
             coarse: np.ndarray) -> None:
    """Faint strokes and arcs that belong to no class (so that "any edge" is not a cue)."""
    base = coarse.mean(axis=(0, 1))
    for _ in range(int(rng.integers(2, 6))):
        # Faint: a 25-40% blend of a random colour into the mean background colour.
        alpha = rng.uniform(0.25, 0.4)
        col = tuple(int(c) for c in (1 - alpha) * base + alpha * rng.uniform(0, 255, 3))
        width = max(1, round(rng.uniform(0.01, 0.04) * side))
        if rng.random() < 0.6:
            pts = rng.uniform(-0.1, 1.1, size=(int(rng.integers(2, 5)), 2)) * side
            draw.line([tuple(p) for p in pts], fill=col, width=width, joint="curve")
        else:
            # Short (<= 110 degrees) and wide, so no arc reads as a ring or crescent.
            c = rng.uniform(0, 1, 2) * side
            rx, ry = rng.uniform(0.2, 0.5, 2) * side
            a0 = rng.uniform(0, 360)
            draw.arc([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], a0,
                     a0 + rng.uniform(40, 110), fill=col, width=width)


def _pick_colour(rng: np.random.Generator, used: set[str],
                 local: np.ndarray) -> tuple[str, tuple[int, int, int]]:
    """A colour not used yet in the scene, contrasting with the background under it."""
    order = rng.permutation(len(COLOUR_NAMES))
    best_name, best_dist = None, -1.0
    for i in order:
        name = COLOUR_NAMES[i]
        if name in used:
            continue
        # Worst case over the coarse cells the object covers.
        dist = float(np.min(np.linalg.norm(local - np.asarray(COLOURS[name]), axis=1)))
        if dist >= _MIN_CONTRAST:
            best_name = name
            break
        if dist > best_dist:
            best_name, best_dist = name, dist
    assert best_name is not None
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[best_name]) + jitter, 0, 255))
    return best_name, rgb  # type: ignore[return-value]


def _layout(rng: np.random.Generator, side: int) -> list[tuple[str, float, float, float]]:
    """Classes, centres and radii (pixels); the dominant object comes first."""
    n = int(rng.integers(1, _MAX_OBJECTS + 1))
    dominant = SHAPES[int(rng.integers(len(SHAPES)))]
    others = [s for s in SHAPES if s != dominant]
    picks = [others[i] for i in rng.choice(len(others), size=n - 1, replace=False)]

    r_dom = rng.uniform(*_DOM_RADIUS) * side
    dom_area = UNIT_AREA[dominant] * r_dom**2
    margin = 0.9  # allow a sliver of the bounding circle past the border
    c = rng.uniform(margin * r_dom, side - margin * r_dom, 2)
    placed = [(dominant, float(c[0]), float(c[1]), float(r_dom))]
    for shape in picks:
        # Cap the radius so the area stays below dominant / _DOMINANCE. The cap only
        # bites for bulky shapes (circle, heart) next to a small slim dominant (arrow);
        # then the lower bound gives way rather than the dominance guarantee.
        cap = math.sqrt(dom_area / (_DOMINANCE * UNIT_AREA[shape]))
        hi = min(_OTHER_RADIUS[1] * side, cap)
        lo = min(_OTHER_RADIUS[0] * side, 0.85 * hi)
        r = rng.uniform(lo, hi)
        for _ in range(40):
            c = rng.uniform(margin * r, side - margin * r, 2)
            # Bounding circles may overlap by at most a quarter of the radii sum, so
            # every object stays mostly visible.
            if all(math.hypot(c[0] - x, c[1] - y) >= 0.75 * (r + rr) for _, x, y, rr in placed):
                placed.append((shape, float(c[0]), float(c[1]), float(r)))
                break
        # No room after 40 tries: the object is dropped (the scene has fewer objects).
    return placed


def _draw_object(draw: ImageDraw.ImageDraw, obj: _Object) -> None:
    r = obj.radius
    box = [obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r]
    if obj.shape == "circle":
        draw.ellipse(box, fill=obj.rgb)
    elif obj.shape == "ring":
        draw.ellipse(box, outline=obj.rgb, width=max(1, round(r * (1 - RING_INNER))))
    else:
        ca, sa = math.cos(obj.angle), math.sin(obj.angle)
        pts = POLYGONS[obj.shape] @ np.array([[ca, sa], [-sa, ca]]) * r + [obj.cx, obj.cy]
        draw.polygon([tuple(p) for p in pts.tolist()], fill=obj.rgb)


def _caption(objects: Sequence[_Object]) -> str:
    parts = [f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape}" for o in objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def generate_scene(index: int, seed: int = 0, size: int = 64) -> Scene:
    """Generate scene number ``index`` of the stream ``seed`` at ``size`` x ``size`` px.

    Pure function of its arguments: byte-identical output on every call and process.

    Args:
        index: scene number, >= 0.
        seed: stream seed, >= 0 (use ``split_seed`` for held-out evaluation streams).
        size: output side in pixels, >= 16. The layout is drawn in relative units,
            so the same (index, seed) gives the same scene at every size.

    Returns:
        Scene with image (size, size, 3) uint8.
    """
    _check_args(index, seed, size)
    rng = np.random.default_rng([int(seed), int(index)])
    # Every random draw is in units relative to the side, so one (index, seed) gives
    # the same scene at every size; only the rasterisation changes.
    side = size * _SUPERSAMPLE
    canvas, coarse = _background(rng, size, side)
    draw = ImageDraw.Draw(canvas)
    _clutter(rng, draw, side, coarse)

    placed = _layout(rng, side)
    used: set[str] = set()
    objects: list[_Object] = []
    for shape, cx, cy, r in placed:
        colour, rgb = _pick_colour(rng, used, _local_colour(coarse, side, cx, cy, r))
        used.add(colour)
        tilt = MAX_TILT.get(shape, math.pi)
        angle = float(rng.uniform(-tilt, tilt))
        objects.append(_Object(shape, colour, rgb, cx, cy, r, angle))
    # Dominant last, so it is on top and fully visible.
    for obj in objects[1:] + objects[:1]:
        _draw_object(draw, obj)

    small = canvas.resize((size, size), Image.BOX)  # box filter: antialiasing
    img = np.asarray(small, dtype=np.int16)
    # A little sensor-like noise so flat regions are not perfectly flat.
    img = img + rng.integers(-4, 5, size=img.shape, dtype=np.int16)
    image = np.clip(img, 0, 255).astype(np.uint8)
    return Scene(
        image=image,
        classes=tuple(sorted(o.shape for o in objects)),
        dominant=objects[0].shape,
        caption=_caption(objects),
        dominant_place=(objects[0].cx / side, objects[0].cy / side, objects[0].radius / side),
    )


# --------------------------------------------------------------------------- batches


def generate_batch(indices: Iterable[int], seed: int = 0, size: int = 64) -> dict[str, np.ndarray]:
    """Generate scenes ``indices`` of stream ``seed`` as a column batch.

    Returns:
        dict with
          "key": (N,) str, ``"scene-{seed}-{index}"`` (unique across streams);
          "image": (N, size, size, 3) uint8;
          "label": (N,) int64, index of the dominant class in ``SHAPES``;
          "labels": (N, len(SHAPES)) uint8 multi-hot of the classes present;
          "caption": (N,) str;
          "place": (N, 3) float32, the dominant object's centre x, y and radius as fractions
          of the side.
    """
    idx = [int(i) for i in np.asarray(list(indices), dtype=np.int64).reshape(-1)]
    n = len(idx)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    label = np.empty(n, dtype=np.int64)
    labels = np.zeros((n, len(SHAPES)), dtype=np.uint8)
    place = np.empty((n, 3), dtype=np.float32)
    captions, keys = [], []
    for j, i in enumerate(idx):
        scene = generate_scene(i, seed=seed, size=size)
        images[j] = scene.image
        label[j] = SHAPE_INDEX[scene.dominant]
        labels[j, [SHAPE_INDEX[c] for c in scene.classes]] = 1
        place[j] = scene.dominant_place
        captions.append(scene.caption)
        keys.append(f"scene-{int(seed)}-{i}")
    return {
        "key": np.asarray(keys, dtype=str),
        "image": images,
        "label": label,
        "labels": labels,
        "caption": np.asarray(captions, dtype=str),
        "place": place,
    }


def scenes_from_range_batch(batch: dict, seed: int = 0, size: int = 64) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` UDF over ``ray.data.range(n)``: ``{"id": (N,)}`` -> scenes.

    Example::

        ds = ray.data.range(n).map_batches(
            scenes_from_range_batch, fn_kwargs={"seed": split_seed(0, "train"), "size": 64})
    """
    if "id" not in batch:
        raise KeyError(f"expected a batch from ray.data.range with an 'id' column, got {list(batch)}")
    return generate_batch(np.asarray(batch["id"]), seed=seed, size=size)


def split_seed(seed: int, split: str) -> int:
    """Stream seed of a split: "train" -> ``seed``; evaluation splits -> derived seeds.

    ``seed`` must lie in [0, 2**32). The evaluation seeds come from a SHA-256 of
    (split, seed) and lie in [2**32, 2**63), so they never equal any training seed:
    held-out scenes never coincide with training scenes, whatever training seed is used.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    seed = int(seed)
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if split == "train":
        return seed
    digest = hashlib.sha256(f"rayssl.scenes/{split}/{seed}".encode()).digest()
    return _SEED_LIMIT + int.from_bytes(digest[:8], "little") % (2**63 - _SEED_LIMIT)


@functools.lru_cache(maxsize=4)
def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which a run visits scenes ``range(num_images)`` in ``epoch``: a permutation
    seeded by (seed, epoch), the same in every process (a new global shuffle every epoch)."""
    return np.random.default_rng([seed, epoch, 0x5CE7E5]).permutation(num_images)
