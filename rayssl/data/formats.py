"""What kind of file a path names (image, tar shard, Parquet shard), by its extension. No Ray import."""

from __future__ import annotations

import io
import posixpath

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
TAR_EXTENSIONS = ("tar",)
PARQUET_EXTENSIONS = ("parquet", "pq")

__all__ = ["IMAGE_EXTENSIONS", "PARQUET_EXTENSIONS", "TAR_EXTENSIONS", "encode_image", "extension",
           "kind_of"]


def encode_image(image, image_format: str = "jpg") -> bytes:
    """A uint8 (H, W, 3) array as PNG (``image_format`` "png") or JPEG (quality 95) bytes."""
    from PIL import Image

    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def extension(path: str) -> str:
    """Lower-case extension without the dot ("" when none)."""
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[1].lower() if "." in base else ""


def kind_of(path: str) -> str | None:
    ext = extension(path)
    if ext in IMAGE_EXTENSIONS:
        return "images"
    if ext in TAR_EXTENSIONS:
        return "webdataset"
    if ext in PARQUET_EXTENSIONS:
        return "parquet"
    return None
