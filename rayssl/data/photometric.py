"""Per-crop photometric augmentation on the CPU: flip, colour jitter, grayscale, Gaussian blur.

SwAV's recipe (Caron et al. 2020 and the official ``main_swav.py``): each crop gets its own
horizontal flip, colour jitter (brightness, contrast, saturation, hue in a random order) with
probability ``jitter_p``, grayscale with ``grayscale_p`` and blur with ``blur_p``. The ops are
vectorised with numpy over every crop of one size in a batch, each crop with its own drawn
parameters, so the Python overhead is paid per batch. ``draw_photometric`` draws the
parameters; the device path (``rayssl.data.gpu_augment``) draws them with the same function,
so both paths sample one distribution. No Ray import.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

__all__ = ["PhotometricParams", "apply_photometric", "blur_kernel_size", "draw_photometric", "photometric"]


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-kernel width for a crop of side ``size``: ~10% of it (SimCLR/SwAV).

    ``2 * (size // 20) + 1`` gives 23 for 224 (SimCLR's value) and 9 for 96. Tiny crops
    still get 3 taps so that blur is not silently a no-op, and the kernel never
    exceeds the crop (reflect padding needs ``radius < size``).
    """
    k = max(3, 2 * (size // 20) + 1)
    while k > 1 and k // 2 >= size:
        k -= 2
    return k


# --------------------------------------------------------------------------------------
# Photometric ops on channel-first float32 batches x: (M, 3, S, S) with values in
# [0, 255] and one factor per sample, shape (M,). Channel-first keeps every
# per-channel op contiguous (channel-last reductions over a size-3 axis were the
# bottleneck). Every op clamps its result, like torchvision does after each
# ColorJitter step, so the random order matters exactly as it does there.


def _gray(x: np.ndarray) -> np.ndarray:
    """(M, 3, S, S) -> (M, 1, S, S) luma (ITU-R 601-2, as PIL and torchvision)."""
    g = x[:, 0:1] * 0.299
    g += x[:, 1:2] * 0.587
    g += x[:, 2:3] * 0.114
    return g


def _brightness(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    x *= f[:, None, None, None]
    return np.clip(x, 0.0, 255.0, out=x)


def _blend(x: np.ndarray, other: np.ndarray, f: np.ndarray) -> np.ndarray:
    # f * x + (1 - f) * other, in x's buffer.
    x -= other
    x *= f[:, None, None, None]
    x += other
    return np.clip(x, 0.0, 255.0, out=x)


def _contrast(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    # Blend towards the mean luma of each image (torchvision's definition).
    return _blend(x, _gray(x).mean(axis=(1, 2, 3), keepdims=True), f)


def _saturation(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    return _blend(x, _gray(x), f)


def _hue(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Rotate the HSV hue of each sample by ``shift`` turns (|shift| <= 0.5)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = np.maximum(np.maximum(r, g), b)
    chroma = maxc - np.minimum(np.minimum(r, g), b)
    inv = np.divide(1.0, chroma, out=np.zeros_like(chroma), where=chroma > 0)
    # Hue in sixths of a turn, by which channel is the max (colorsys' formula). Grey
    # pixels (chroma 0) get h = 0 through inv = 0 and come back unchanged anyway.
    h = np.where(maxc == r, (g - b) * inv, np.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h += (6.0 * shift)[:, None, None]
    h %= 6.0
    # HSV -> RGB without branches: channel n is v - c * clip(min(k, 4 - k), 0, 1) with
    # k = (h + n) mod 6 and n = 5, 3, 1 for R, G, B. Written into x (r, g, b are no
    # longer needed).
    k = np.empty_like(h)
    t = np.empty_like(h)
    for ch, n in enumerate((5.0, 3.0, 1.0)):
        np.add(h, n, out=k)
        k[k >= 6.0] -= 6.0
        np.subtract(4.0, k, out=t)
        np.minimum(k, t, out=k)
        np.clip(k, 0.0, 1.0, out=k)
        k *= chroma
        np.subtract(maxc, k, out=x[:, ch])
    return np.clip(x, 0.0, 255.0, out=x)


_JITTER_OPS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    _brightness,
    _contrast,
    _saturation,
    _hue,
)


def _gaussian_blur(x: np.ndarray, sigma: np.ndarray, ksize: int) -> np.ndarray:
    """Separable truncated Gaussian, one sigma per sample, reflect padding (torchvision).

    x: (M, C, S, S) float32 -> (M, C, S, S) float32.
    """
    r = ksize // 2
    if r == 0:
        return x
    taps = np.arange(-r, r + 1, dtype=np.float32)
    w = np.exp(-0.5 * (taps[None, :] / sigma[:, None].astype(np.float32)) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    wc = w[:, :, None, None, None]  # (M, K, 1, 1, 1)
    s = x.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    # The kernel is symmetric: pair taps i and K-1-i to halve the multiplies.
    buf = np.empty((x.shape[0], x.shape[1], s, s + 2 * r), dtype=np.float32)
    rows = xp[:, :, r : r + s] * wc[:, r]
    for i in range(r):
        np.add(xp[:, :, i : i + s], xp[:, :, ksize - 1 - i : ksize - 1 - i + s], out=buf)
        buf *= wc[:, i]
        rows += buf
    buf = buf[..., :s]
    out = rows[..., r : r + s] * wc[:, r]
    for i in range(r):
        np.add(rows[..., i : i + s], rows[..., ksize - 1 - i : ksize - 1 - i + s], out=buf)
        buf *= wc[:, i]
        out += buf
    return out


_CHUNK_BYTES = 1 << 20


def _photometric_chunk(
    crops: np.ndarray,
    flip: np.ndarray,
    do_jitter: np.ndarray,
    factors: np.ndarray,
    order: np.ndarray,
    do_gray: np.ndarray,
    do_blur: np.ndarray,
    sigma: np.ndarray,
    ksize: int,
) -> np.ndarray:
    """Apply pre-drawn per-crop parameters: uint8 (M, S, S, 3) -> uint8 (M, S, S, 3)."""
    m, s = crops.shape[0], crops.shape[1]
    # Channel-first float copy; the flip is folded into this copy.
    x = np.empty((m, 3, s, s), dtype=np.float32)
    x[~flip] = crops[~flip].transpose(0, 3, 1, 2)
    x[flip] = crops[flip, :, ::-1].transpose(0, 3, 1, 2)

    if do_jitter.any():
        for step in range(4):
            for op_id, op in enumerate(_JITTER_OPS):
                idx = np.flatnonzero(do_jitter & (order[:, step] == op_id))
                if idx.size:
                    x[idx] = op(x[idx], factors[idx, op_id])

    if do_gray.any():
        idx = np.flatnonzero(do_gray)
        x[idx] = _gray(x[idx])

    if ksize > 1 and do_blur.any():
        idx = np.flatnonzero(do_blur)
        x[idx] = _gaussian_blur(x[idx], sigma[idx], ksize)

    # Round to nearest; the clip only catches blur round-off.
    np.clip(x, 0.0, 255.0, out=x)
    x += 0.5
    out = np.empty((m, s, s, 3), dtype=np.uint8)
    out.transpose(0, 3, 1, 2)[...] = x
    return out


class PhotometricParams(NamedTuple):
    """Pre-drawn photometric parameters of M crops (see ``draw_photometric``)."""

    flip: np.ndarray  # bool (M,)
    do_jitter: np.ndarray  # bool (M,)
    factors: np.ndarray  # float32 (M, 4): brightness, contrast, saturation, hue
    order: np.ndarray  # int (M, 4): order of the four jitter ops
    do_gray: np.ndarray  # bool (M,)
    do_blur: np.ndarray  # bool (M,)
    sigma: np.ndarray  # float (M,)


def draw_photometric(m: int, spec, rng: np.random.Generator) -> PhotometricParams:
    """Draw the flip/jitter/grayscale/blur parameters of ``m`` crops, vectorised, so the
    RNG stream depends only on ``m``."""
    flip = rng.random(m) < spec.flip_p
    j = spec.jitter
    # jitter = 0 means no colour jitter at all (skip the work, keep the RNG stream).
    do_jitter = (rng.random(m) < spec.jitter_p) & (j > 0)
    factors = np.empty((m, 4), dtype=np.float32)
    factors[:, :3] = rng.uniform(max(0.0, 1.0 - j), 1.0 + j, size=(m, 3))
    factors[:, 3] = rng.uniform(-j / 4.0, j / 4.0, size=m)
    order = np.argsort(rng.random((m, 4)), axis=1)  # a random permutation per crop
    do_gray = rng.random(m) < spec.grayscale_p
    do_blur = rng.random(m) < spec.blur_p
    sigma = rng.uniform(spec.blur_sigma[0], spec.blur_sigma[1], size=m)
    return PhotometricParams(flip, do_jitter, factors, order, do_gray, do_blur, sigma)


def apply_photometric(crops: np.ndarray, params: PhotometricParams) -> np.ndarray:
    """uint8 (M, S, S, 3) crops with their parameters -> uint8 (M, S, S, 3)."""
    m, s = crops.shape[0], crops.shape[1]
    out = np.empty_like(crops)
    ksize = blur_kernel_size(s)
    # Work in chunks of about 1 MiB of float32 so every pass over the data stays in
    # cache: the ops below make ~50 passes, and a whole batch of 224-px crops is tens
    # of MiB (chunking made the full-size recipe ~2x faster).
    step = max(1, _CHUNK_BYTES // (12 * s * s))
    for a in range(0, m, step):
        sl = slice(a, min(a + step, m))
        out[sl] = _photometric_chunk(crops[sl], *(p[sl] for p in params), ksize)
    return out


def photometric(
    crops: np.ndarray, spec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip + jitter + grayscale + blur, independent parameters per crop.

    ``crops``: uint8 (M, S, S, 3) -> (uint8 (M, S, S, 3), flipped bool (M,)).
    """
    params = draw_photometric(crops.shape[0], spec, rng)
    return apply_photometric(crops, params), params.flip
