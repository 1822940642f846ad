"""Ship encoded images to the training worker instead of crops (``data.augment_on = "device"``).

Torch-free, because it runs inside Ray Data tasks: the marker that switches the pipeline
to shipping, and the header-only screening that keeps the CPU path's skip accounting.
The worker side (decode + multi-crop on the device) is ``rayssl.data.gpu_augment``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from rayssl.data.multicrop import MultiCropSpec

__all__ = ["ShipToDevice", "check_encoded"]


@dataclass(frozen=True)
class ShipToDevice:
    """``data.augment_on = "device"``: the Ray Data tasks ship each sample's encoded bytes
    (``encoded``; the built-in scenes ship their uint8 pixels as ``image``) and its
    augmentation key (``key``) instead of crops; the training worker decodes and crops
    with :func:`device_crop_batches`. ``spec`` is the multi-crop recipe it will apply."""

    spec: MultiCropSpec


def check_encoded(blobs: Sequence[bytes], min_side: int = 1, max_pixels: int | None = None) -> tuple[list[int], Counter]:
    """Header-only screening of encoded images for the ``augment_on = "device"`` path.

    Returns ``(indices of usable blobs, Counter of skip reasons)`` with the reasons of
    ``rayssl.data.decode.SkipReason`` (empty, decode_error for an unidentifiable format,
    too_small, too_large): what the CPU path would skip before decoding. Nothing is
    decoded here -- that is the point -- so a file truncated after a valid header is
    only found by the worker's decoder (:func:`device_crop_batches` replaces it).
    """
    import io
    import warnings

    from PIL import Image

    from rayssl.data.decode import DEFAULT_MAX_PIXELS, SkipReason

    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    good, skipped = [], Counter()
    for i, blob in enumerate(blobs):
        if not blob:
            skipped[SkipReason.empty.value] += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(blob)) as im:  # lazy: reads the header only
                    w, h = im.size
        except Image.DecompressionBombError:
            skipped[SkipReason.too_large.value] += 1
            continue
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - not an image PIL can identify
            skipped[SkipReason.decode_error.value] += 1
            continue
        if w * h > max_pixels:
            skipped[SkipReason.too_large.value] += 1
        elif min(w, h) < min_side:
            skipped[SkipReason.too_small.value] += 1
        else:
            good.append(i)
    return good, skipped
