"""SwAV multi-crop augmentation on the CPU, with per-sample randomness.

Caron et al. 2020 (arXiv:2006.09882), Sec. 3.2 and the official ``main_swav.py``:
every image yields ``2 x 224`` crops at scale (0.14, 1) and ``6 x 96`` crops at
scale (0.05, 0.14); each crop then gets its own horizontal flip, colour jitter
(0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale with p=0.2 and Gaussian blur with p=0.5.

This module runs inside Ray Data ``map_batches`` workers, so it must not import Ray
and it must be fast on one core:

* geometry (RandomResizedCrop + bilinear antialiased resize) is done per crop by
  Pillow in a single ``resize(box=...)`` call, which crops and resamples without
  materialising the crop;
* the photometric ops (flip, jitter, grayscale, blur; ``rayssl.data.photometric``) are
  vectorised with numpy over every crop of the same size in the batch, each with its own
  random parameters, so the Python overhead is paid per batch and not per crop.

Outputs stay ``uint8`` (N, S, S, 3); normalisation happens later on the accelerator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from rayssl.data.photometric import PhotometricParams, apply_photometric, blur_kernel_size, draw_photometric

__all__ = [
    "CropParams",
    "MultiCrop",
    "MultiCropSpec",
    "blur_kernel_size",
    "crop_spec",
    "multicrop_batch",
    "sample_crop_params",
    "sample_generators",
    "stable_key",
]

@dataclass(frozen=True)
class MultiCropSpec:
    """Which crops to cut from each image and how strongly to augment them.

    Crop groups are listed in order; group ``g`` yields ``counts[g]`` square crops of
    side ``sizes[g]`` whose area is a fraction in ``[min_scale[g], max_scale[g]]`` of
    the source image. Crops are emitted group by group, so same-size crops are
    contiguous (the backbone processes each size as one batch).

    ``jitter`` is the brightness/contrast/saturation strength, i.e. ``0.8 * s`` in
    SimCLR's notation (s = 1 in SwAV); hue gets ``0.2 * s = jitter / 4``.
    """

    sizes: tuple[int, ...]
    counts: tuple[int, ...]
    min_scale: tuple[float, ...]
    max_scale: tuple[float, ...]
    jitter: float = 0.8
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self) -> None:
        # Accept lists (YAML gives lists) but store tuples so the spec stays hashable.
        for name in ("sizes", "counts", "min_scale", "max_scale", "blur_sigma", "ratio"):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, tuple(value))
            except TypeError:
                raise ValueError(f"{name} must be a sequence, got {value!r}") from None

        n = len(self.sizes)
        if n == 0:
            raise ValueError("sizes must name at least one crop group")
        for name in ("counts", "min_scale", "max_scale"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries but sizes has {n}: "
                    "give one value per crop group"
                )
        for s in self.sizes:
            if int(s) != s or s <= 0:
                raise ValueError(f"sizes must be positive integers, got {self.sizes}")
        for c in self.counts:
            if int(c) != c or c < 1:
                raise ValueError(f"counts must be integers >= 1, got {self.counts}")
        if self.counts[0] < 2:
            # SwAV computes codes on the two large crops and swaps them.
            raise ValueError(
                f"counts[0] must be >= 2 (SwAV assigns codes to the first group's "
                f"crops), got {self.counts[0]}"
            )
        for lo in self.min_scale:
            if not 0.0 < lo <= 1.0:
                raise ValueError(f"min_scale must lie in (0, 1], got {self.min_scale}")
        for g, (lo, hi) in enumerate(zip(self.min_scale, self.max_scale)):
            if not lo <= hi <= 1.0:
                raise ValueError(
                    f"max_scale[{g}]={hi} must satisfy min_scale[{g}]={lo} <= max_scale <= 1"
                )
        if not 0.0 <= self.jitter <= 2.0:
            # hue = jitter / 4 must stay within torchvision's [0, 0.5].
            raise ValueError(f"jitter must lie in [0, 2], got {self.jitter}")
        for name in ("jitter_p", "grayscale_p", "blur_p", "flip_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (lo, hi) with 0 < lo <= hi, got {self.blur_sigma}")
        if len(self.ratio) != 2 or not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio}")

    @classmethod
    def swav_paper(cls) -> "MultiCropSpec":
        """The paper's recipe: 2 x 224 at (0.14, 1) + 6 x 96 at (0.05, 0.14)."""
        return cls(sizes=(224, 96), counts=(2, 6), min_scale=(0.14, 0.05), max_scale=(1.0, 0.14))

    @property
    def num_crops(self) -> int:
        return int(sum(self.counts))

    @property
    def crop_sizes(self) -> list[int]:
        """Side of every crop, in output order (``len == num_crops``)."""
        return [int(s) for s, c in zip(self.sizes, self.counts) for _ in range(c)]

    @property
    def max_size(self) -> int:
        return int(max(self.sizes))


def crop_spec(d) -> MultiCropSpec:
    """The spec of a run's ``data`` section (the pipeline, device augmentation and the
    single-process benchmarks all cut crops from this one)."""
    return MultiCropSpec(sizes=tuple(d.crop_sizes), counts=tuple(d.crop_counts),
                         min_scale=tuple(d.min_scale), max_scale=tuple(d.max_scale),
                         jitter=d.color_jitter, jitter_p=d.color_jitter_p,
                         grayscale_p=d.grayscale_p, blur_p=d.blur_p)


class CropParams(NamedTuple):
    """Geometry of one crop in source-image pixels (before the resize)."""

    top: int
    left: int
    height: int
    width: int
    flipped: bool


def sample_crop_params(
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Sample a RandomResizedCrop box in an ``h x w`` image -> (top, left, height, width).

    Same distribution as torchvision's ``RandomResizedCrop.get_params``: the area
    fraction is uniform in ``scale`` and the aspect ratio (width / height) is
    log-uniform in ``ratio``; a draw whose box does not fit is rejected, and after 10
    rejections the largest centred box whose ratio is clamped into ``ratio`` is used.
    Kept standalone so a batched GPU sampler can be checked against it.
    """
    area = float(h * w)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    # Fallback: centre crop, as wide as the ratio range allows.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def sample_generators(seed: int, epoch: int, keys: Sequence[int]) -> list[np.random.Generator]:
    """One generator per sample, seeded by (seed, epoch, key): pass the list as
    ``multicrop_batch``'s ``rng`` and each image's crops depend only on its own key, not on
    which batch, task or worker it lands in -- a run with the same seed (and a resumed run)
    cuts the same crops from the same image in the same epoch.

    ``keys``: non-negative ints identifying each sample stably (``stable_key`` of a path).
    """
    return [np.random.default_rng((seed, epoch, int(k))) for k in keys]


def stable_key(value: str | bytes) -> int:
    """A 64-bit key of a path or of a sample's bytes, the same in every process (unlike
    ``hash()``, which Python salts per process)."""
    import hashlib

    data = value.encode() if isinstance(value, str) else bytes(value)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has an empty side: shape {image.shape}")
    return np.ascontiguousarray(image)


def _multicrop(
    images: Sequence[np.ndarray], spec: MultiCropSpec, rng: np.random.Generator | Sequence[np.random.Generator]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """-> (crops, boxes): per crop index j, uint8 (N, s_j, s_j, 3) and int32 (N, 5).

    ``boxes[j][n]`` is (top, left, height, width, flipped) of crop j of image n. ``rng``:
    one generator for the batch, or one per image (each image's draws then come from its
    own generator only).
    """
    n = len(images)
    per_image = not isinstance(rng, np.random.Generator)
    if per_image:
        rngs = list(rng)
        if len(rngs) != n:
            raise ValueError(f"got {len(rngs)} generators for {n} images: give one per image")
    pils = [Image.fromarray(_check_image(im)) for im in images]
    bilinear = Image.Resampling.BILINEAR
    crops: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    for size, count, lo, hi in zip(spec.sizes, spec.counts, spec.min_scale, spec.max_scale):
        size = int(size)
        group = np.empty((n, count, size, size, 3), dtype=np.uint8)
        geo = np.empty((n, count, 5), dtype=np.int32)
        for i, pil in enumerate(pils):
            w, h = pil.size
            r = rngs[i] if per_image else rng
            for c in range(count):
                top, left, ch, cw = sample_crop_params(h, w, (lo, hi), spec.ratio, r)
                # Pillow crops and resamples in one pass; its bilinear filter widens
                # with the downscale factor, i.e. it is antialiased like
                # torchvision's resize(antialias=True).
                group[i, c] = np.asarray(
                    pil.resize((size, size), bilinear, box=(left, top, left + cw, top + ch))
                )
                geo[i, c, :4] = (top, left, ch, cw)
        if per_image:  # image-major, as the reshape below
            drawn = [draw_photometric(count, spec, r) for r in rngs]
            params = PhotometricParams(*(np.concatenate(p) for p in zip(*drawn)))
        else:
            params = draw_photometric(n * count, spec, rng)
        flat = apply_photometric(group.reshape(n * count, size, size, 3), params)
        flat = flat.reshape(n, count, size, size, 3)
        geo[:, :, 4] = params.flip.reshape(n, count)
        for c in range(count):
            crops.append(np.ascontiguousarray(flat[:, c]))
            boxes.append(np.ascontiguousarray(geo[:, c]))
    return crops, boxes


class MultiCrop:
    """Callable that turns one RGB image into ``spec.num_crops`` augmented crops.

    ``MultiCrop(spec)(image, rng)`` gives the same crops as
    ``multicrop_batch([image], spec, rng)`` for the same RNG state.
    """

    def __init__(self, spec: MultiCropSpec):
        if not isinstance(spec, MultiCropSpec):
            raise TypeError(f"spec must be a MultiCropSpec, got {type(spec).__name__}")
        self.spec = spec

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, return_params: bool = False
    ) -> list[np.ndarray] | tuple[list[np.ndarray], list[CropParams]]:
        """image: uint8 (H, W, 3) -> list of uint8 (s_j, s_j, 3), j < num_crops.

        With ``return_params`` also returns the geometry of each crop.
        """
        crops, boxes = _multicrop([image], self.spec, rng)
        out = [c[0] for c in crops]
        if not return_params:
            return out
        params = [CropParams(int(b[0, 0]), int(b[0, 1]), int(b[0, 2]), int(b[0, 3]), bool(b[0, 4])) for b in boxes]
        return out, params

    def __repr__(self) -> str:
        return f"MultiCrop({self.spec!r})"


def multicrop_batch(
    images: Sequence[np.ndarray],
    spec: MultiCropSpec,
    rng: np.random.Generator | Sequence[np.random.Generator],
    return_params: bool = False,
) -> dict[str, np.ndarray]:
    """Multi-crop a batch of RGB images (each its own size) into stacked crop arrays.

    images: N arrays uint8 (H_i, W_i, 3). rng: one generator for the whole batch, or one
    per image (``sample_generators``: each image's crops then do not depend on the batch).
    Returns ``{"crop_j": uint8 (N, s_j, s_j, 3)}`` for j < spec.num_crops; with
    ``return_params`` also ``{"crop_j_params": int32 (N, 5)}`` holding
    (top, left, height, width, flipped) in source pixels.
    """
    if len(images) == 0:
        raise ValueError("multicrop_batch needs at least one image")
    crops, boxes = _multicrop(images, spec, rng)
    out = {f"crop_{j}": c for j, c in enumerate(crops)}
    if return_params:
        out.update({f"crop_{j}_params": b for j, b in enumerate(boxes)})
    return out
