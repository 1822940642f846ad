"""Bytes -> RGB uint8 arrays, robust to what uncurated buckets contain.

Web-scraped and user-uploaded buckets hold truncated downloads, HTML error pages saved
as ``.jpg``, zero-byte placeholders, decompression bombs, CMYK scans, 16-bit PNGs,
transparent logos and phone photos stored sideways with an EXIF orientation tag. The
pipeline must neither crash on them nor feed them to the model silently changed, so
every image is either converted to RGB (and the conversion named, for counting) or
skipped with a reason.

Runs inside Ray Data ``map_batches`` workers: no Ray import here.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from enum import Enum
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ALPHA_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "SkipReason",
    "decode_batch",
    "decode_image",
]

# Same number as PIL's default Image.MAX_IMAGE_PIXELS (~ 1024 * 1024 * 1024 // 4 // 3).
DEFAULT_MAX_PIXELS = 89_478_485

# Transparent pixels are composited onto the ImageNet mean colour: after the usual
# mean/std normalisation it becomes 0, the least informative input, where black or
# white would paint a strong artificial edge around every logo.
ALPHA_BACKGROUND = (124, 116, 104)

_EXIF_ORIENTATION = 0x0112


class SkipReason(str, Enum):
    """Why an input produced no image."""

    decode_error = "decode_error"  # truncated, corrupt, or not an image at all
    empty = "empty"  # zero bytes
    too_small = "too_small"  # shorter side below min_side
    too_large = "too_large"  # more pixels than max_pixels (decompression bomb)

    def __str__(self) -> str:
        return self.value


def _scale_to_uint8(arr: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Linearly map ``[0, full_scale]`` (or ``[min, max]`` when None) onto 0..255."""
    a = arr.astype(np.float64)
    if full_scale is None:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    else:
        a = a * (255.0 / full_scale)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _high_depth_to_gray8(im: Image.Image) -> tuple[Image.Image, str]:
    """Modes I;16*, I and F -> an 8-bit "L" image, scaled rather than clipped.

    PIL's own ``convert("L")`` clips these modes at 255, which turns a normal
    16-bit photo almost entirely white.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(arr, 65535.0), "L"), "16bit"
    if im.mode == "I":
        # 16-bit PNG/TIFF greyscale decode to "I" in some Pillow versions; anything
        # outside the 16-bit range is an unusual 32-bit image: stretch its range.
        in_16bit = arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535)
        return Image.fromarray(_scale_to_uint8(arr, 65535.0 if in_16bit else None), "L"), "16bit"
    # "F": 32-bit float (scientific TIFFs). [0, 1] data is the common convention.
    finite = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    in_unit = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
    return Image.fromarray(_scale_to_uint8(finite, 1.0 if in_unit else None), "L"), "float"


def _composite(im: Image.Image) -> Image.Image:
    """RGBA-like image -> RGB over ALPHA_BACKGROUND (alpha-weighted, not dropped)."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> ("RGB" image, name of the conversion or None)."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in ("1", "L"):
        return im.convert("RGB"), "grayscale"
    if mode in ("P", "PA"):
        # A palette may carry transparency (tRNS chunk or a PA alpha band); expanding
        # to RGBA first keeps it, so transparent pixels get the neutral background
        # rather than whatever colour the palette entry happens to hold.
        if mode == "PA" or "transparency" in im.info:
            return _composite(im), "palette"
        return im.convert("RGB"), "palette"
    if mode in ("RGBA", "RGBa", "LA", "La"):
        return _composite(im), "alpha"
    if mode == "CMYK":
        return im.convert("RGB"), "cmyk"
    if mode.startswith("I") or mode == "F":
        gray, name = _high_depth_to_gray8(im)
        return gray.convert("RGB"), name
    # YCbCr, LAB, HSV, RGBX, ...: PIL knows the colour transform.
    return im.convert("RGB"), "colorspace"


def _exif_transpose(im: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as is."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF must not cost us a decodable image
        return im, False
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return im, False
    try:
        rotated = ImageOps.exif_transpose(im)
    except Exception:
        return im, False
    return (rotated if rotated is not None else im), True


def decode_image(
    data: bytes,
    min_side: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray | None, SkipReason | None, str | None]:
    """Decode one encoded image to RGB.

    Returns ``(uint8 (H, W, 3), None, conversion)`` on success, where ``conversion`` is
    None for plain RGB input or one of "grayscale", "palette", "alpha", "cmyk",
    "16bit", "float", "colorspace", "exif_rotated" (joined with "+" when both a mode
    conversion and a rotation happened, e.g. "grayscale+exif_rotated"); or
    ``(None, reason, None)`` when the input is skipped.

    The size check uses the header only (``Image.open`` is lazy), so a decompression
    bomb is rejected before its pixels are allocated. PIL's own bomb guard
    (``Image.MAX_IMAGE_PIXELS``, an error at twice that) still applies on top of
    ``max_pixels``; raise it too to accept larger images. Never raises on bad input;
    ``MemoryError`` and ``KeyboardInterrupt`` propagate.
    """
    if not data:
        return None, SkipReason.empty, None
    try:
        with warnings.catch_warnings():
            # We apply our own limit; PIL's warning between 1x and 2x its limit is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size  # from the header, nothing decoded yet
                if width * height > max_pixels:
                    return None, SkipReason.too_large, None
                if min(width, height) < min_side:
                    return None, SkipReason.too_small, None
                im.load()  # the actual decode: truncation and corruption surface here
                im, rotated = _exif_transpose(im)
                rgb, conversion = _to_rgb(im)
                arr = np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError:
        return None, SkipReason.too_large, None
    except MemoryError:
        raise
    except Exception:
        # UnidentifiedImageError, OSError("image file is truncated"), SyntaxError from
        # some plugins, ValueError, struct.error, zlib errors, ...: all are bad bytes.
        return None, SkipReason.decode_error, None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        return None, SkipReason.decode_error, None
    if rotated:
        conversion = "exif_rotated" if conversion is None else f"{conversion}+exif_rotated"
    return np.ascontiguousarray(arr), None, conversion


def decode_batch(
    blobs: Sequence[bytes],
    min_side: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[np.ndarray | None], Counter, Counter]:
    """Decode many images.

    Returns ``(images, skipped, conversions)``: ``images[i]`` is uint8 (H_i, W_i, 3) or
    None (same order and length as ``blobs``), ``skipped`` counts SkipReason members,
    ``conversions`` counts each conversion once per image (a "grayscale+exif_rotated"
    image adds one to "grayscale" and one to "exif_rotated").
    """
    images: list[np.ndarray | None] = []
    skipped: Counter = Counter()
    conversions: Counter = Counter()
    for blob in blobs:
        img, reason, conversion = decode_image(blob, min_side=min_side, max_pixels=max_pixels)
        images.append(img)
        if reason is not None:
            skipped[reason] += 1
        if conversion is not None:
            conversions.update(conversion.split("+"))
    return images, skipped, conversions
