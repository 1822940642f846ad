"""Tests for bytes -> RGB decoding of uncurated images (rayssl.data.decode)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFile

from rayssl.data import decode as dec
from rayssl.data.decode import ALPHA_BACKGROUND, SkipReason, decode_batch, decode_image


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb_array(h: int = 24, w: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 8 % 256, yy * 10 % 256, np.full_like(xx, 77)], axis=-1).astype(np.uint8)


def _png_gray8(width: int, height: int, value: int = 0) -> bytes:
    """A valid 8-bit greyscale PNG of one colour, written row by row.

    The pixels are never held in memory, so a 10000 x 10000 "bomb" costs ~100 kB.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    comp = zlib.compressobj(6)
    row = b"\x00" + bytes([value]) * width  # filter byte 0, then the row
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------ plain formats


@pytest.mark.parametrize("fmt, lossless", [("PNG", True), ("BMP", True), ("TIFF", True), ("WEBP", False), ("JPEG", False)])
def test_valid_rgb_formats_decode(fmt, lossless):
    src = _rgb_array()
    kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    img, reason, conversion = decode_image(_encode(Image.fromarray(src), fmt, **kw))
    assert reason is None and conversion is None
    assert img.shape == (24, 32, 3) and img.dtype == np.uint8
    if lossless:
        np.testing.assert_array_equal(img, src)
    else:
        assert np.abs(img.astype(int) - src).mean() < 6


# ------------------------------------------------------------------ bad inputs


def test_empty_bytes():
    assert decode_image(b"") == (None, SkipReason.empty, None)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _truncated_jpeg(), id="truncated_jpeg"),
        pytest.param(lambda: _png_gray8(64, 64, 9)[:-40], id="truncated_png"),
        pytest.param(lambda: np.random.default_rng(0).bytes(5000), id="random_bytes"),
        pytest.param(lambda: b"<html><body>404 Not Found</body></html>\n" * 20, id="text"),
        pytest.param(lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, id="png_signature_only"),
    ],
)
def test_corrupt_inputs_are_decode_errors(make):
    data = make()
    assert decode_image(data) == (None, SkipReason.decode_error, None)


def _truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(_rgb_array(64, 64)), "JPEG")
    return data[: len(data) // 2]


def test_truncated_jpeg_header_is_intact():
    """The truncated JPEG above fails in the decode, not at the header: a real test of load()."""
    data = _truncated_jpeg()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (64, 64)


def test_unexpected_exception_types_map_to_decode_error(monkeypatch):
    class Weird(Exception):
        pass

    def boom(*a, **k):
        raise Weird("plugin bug")

    monkeypatch.setattr(dec.Image, "open", boom)
    assert decode_image(b"abc") == (None, SkipReason.decode_error, None)


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
def test_memory_error_and_interrupt_propagate(monkeypatch, exc):
    def boom(*a, **k):
        raise exc()

    monkeypatch.setattr(dec.Image, "open", boom)
    with pytest.raises(exc):
        decode_image(b"abc")


# ---------------------------------------------------------------- conversions


def test_grayscale_png():
    gray = (np.arange(12 * 10).reshape(12, 10) * 2).astype(np.uint8)
    img, reason, conversion = decode_image(_encode(Image.fromarray(gray, "L"), "PNG"))
    assert reason is None and conversion == "grayscale"
    assert img.shape == (12, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], gray)


def test_palette_png_with_transparency():
    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1
    im = Image.fromarray(idx, "P")
    # Entry 0 is bright green but transparent; entry 1 is opaque red.
    im.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    data = _encode(im, "PNG", transparency=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P" and "transparency" in check.info
    img, reason, conversion = decode_image(data)
    assert reason is None and conversion == "palette"
    np.testing.assert_array_equal(img[:, :4], np.broadcast_to(ALPHA_BACKGROUND, (8, 4, 3)))
    np.testing.assert_array_equal(img[:, 4:], np.broadcast_to((255, 0, 0), (8, 4, 3)))


def test_palette_png_without_transparency():
    im = Image.fromarray(_rgb_array()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img, reason, conversion = decode_image(_encode(im, "PNG"))
    assert reason is None and conversion == "palette"
    np.testing.assert_array_equal(img, np.asarray(im.convert("RGB")))


def test_rgba_is_composited_on_neutral_background():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)
    rgba[:, 0:2, 3] = 255  # opaque red
    rgba[:, 2:4, 3] = 0  # fully transparent (its red must not leak through)
    rgba[:, 4:6, 3] = 128  # half transparent
    img, reason, conversion = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert reason is None and conversion == "alpha"
    np.testing.assert_array_equal(img[:, 0:2], np.broadcast_to((255, 0, 0), (4, 2, 3)))
    np.testing.assert_array_equal(img[:, 2:4], np.broadcast_to(ALPHA_BACKGROUND, (4, 2, 3)))
    half = 128 / 255 * np.array([255, 0, 0]) + (1 - 128 / 255) * np.array(ALPHA_BACKGROUND)
    np.testing.assert_allclose(img[:, 4:6].astype(float), np.broadcast_to(half, (4, 2, 3)), atol=1.5)


def test_la_is_composited():
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0] = 200
    la[:, :2, 1] = 255
    img, reason, conversion = decode_image(_encode(Image.fromarray(la, "LA"), "PNG"))
    assert reason is None and conversion == "alpha"
    np.testing.assert_array_equal(img[:, :2], 200)
    np.testing.assert_array_equal(img[:, 2:], np.broadcast_to(ALPHA_BACKGROUND, (4, 2, 3)))


def test_cmyk_jpeg():
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = _encode(im, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    img, reason, conversion = decode_image(data)
    assert reason is None and conversion == "cmyk"
    assert img.shape == (16, 16, 3)
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0), (255, 0, 0), atol=6)


def test_16bit_png_is_scaled_not_clipped():
    vals = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    data = _encode(Image.fromarray(vals), "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode in ("I;16", "I")  # really stored as 16-bit
    img, reason, conversion = decode_image(data)
    assert reason is None and conversion == "16bit"
    assert img.shape == (3, 4, 3)
    row = img[0, :, 0].astype(int)
    assert row[0] == 0 and row[3] == 255
    assert abs(row[1] - 1) <= 1 and abs(row[2] - 128) <= 1
    np.testing.assert_array_equal(img[..., 0], img[..., 2])


def test_32bit_integer_image_uses_its_range():
    vals = np.array([[0, 100_000, 200_000]], dtype=np.int32)
    img, reason, conversion = decode_image(_encode(Image.fromarray(vals, "I"), "TIFF"))
    assert reason is None and conversion == "16bit"
    np.testing.assert_array_equal(img[0, :, 0], [0, 128, 255])


def test_exif_orientation_6_is_applied():
    src = np.zeros((20, 40, 3), np.uint8)
    src[...] = (0, 0, 255)
    src[0:8, 0:8] = (255, 0, 0)  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(Image.fromarray(src), "JPEG", exif=exif.tobytes(), quality=95)
    img, reason, conversion = decode_image(data)
    assert reason is None and conversion == "exif_rotated"
    assert img.shape == (40, 20, 3)  # height and width swapped
    # A clockwise quarter turn moves the top-left corner to the top-right.
    assert img[1:7, 13:19, 0].mean() > 200 and img[1:7, 13:19, 2].mean() < 60
    assert img[1:7, 1:7, 0].mean() < 60  # not left where it was stored
    assert img[33:39, 1:7, 0].mean() < 60 and img[33:39, 13:19, 0].mean() < 60


def test_exif_rotation_combines_with_mode_conversion():
    exif = Image.Exif()
    exif[0x0112] = 3  # 180 degrees
    gray = np.zeros((10, 16), np.uint8)
    gray[:5, :8] = 250
    img, reason, conversion = decode_image(_encode(Image.fromarray(gray, "L"), "JPEG", exif=exif.tobytes(), quality=95))
    assert reason is None and conversion == "grayscale+exif_rotated"
    assert img.shape == (10, 16, 3)
    assert img[6:, 9:].mean() > 200 and img[:4, :7].mean() < 50


# ----------------------------------------------------------------- size checks


def test_too_small():
    data = _encode(Image.fromarray(_rgb_array(24, 32)), "PNG")
    assert decode_image(data, min_side=25) == (None, SkipReason.too_small, None)
    img, reason, _ = decode_image(data, min_side=24)
    assert reason is None and img.shape == (24, 32, 3)


def test_max_pixels_is_configurable():
    data = _encode(Image.fromarray(_rgb_array(24, 32)), "PNG")
    assert decode_image(data, max_pixels=24 * 32 - 1) == (None, SkipReason.too_large, None)
    assert decode_image(data, max_pixels=24 * 32)[1] is None


@pytest.fixture(scope="module")
def bomb() -> bytes:
    # 10000 x 10000 = 1e8 pixels: above the default 89_478_485 but below PIL's own
    # error threshold (2x), so only our header check stands in the way.
    return _png_gray8(10_000, 10_000)


def test_bomb_is_rejected_from_the_header(bomb, monkeypatch):
    assert len(bomb) < 1_000_000  # a small file...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(bomb)) as im:
            assert im.size == (10_000, 10_000)  # ...that is a genuine, valid huge PNG header

    loaded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    assert decode_image(bomb) == (None, SkipReason.too_large, None)
    assert loaded == []  # the pixel data was never decoded

    # Positive control: the same writer's small image does go through load().
    img, reason, _ = decode_image(_png_gray8(30, 20, 7))
    assert reason is None and img.shape == (20, 30, 3) and (img == 7).all()
    assert loaded and set(loaded) == {(30, 20)}


def test_bomb_beyond_pil_guard_is_too_large():
    # Patch a tiny PNG's header to claim 40000 x 40000 (above PIL's own error limit).
    data = bytearray(_png_gray8(4, 4))
    data[16:24] = struct.pack(">II", 40_000, 40_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    assert decode_image(bytes(data)) == (None, SkipReason.too_large, None)


# ----------------------------------------------------------------------- batch


def test_decode_batch_counts():
    exif = Image.Exif()
    exif[0x0112] = 6
    blobs = [
        _encode(Image.fromarray(_rgb_array()), "PNG"),
        b"",
        b"not an image at all",
        _encode(Image.fromarray(_rgb_array()[..., 0], "L"), "PNG"),
        _encode(Image.fromarray(_rgb_array()[..., 0], "L"), "JPEG", exif=exif.tobytes()),
        _encode(Image.fromarray(_rgb_array(8, 8)), "PNG"),
        _encode(Image.new("CMYK", (20, 20)), "JPEG"),
    ]
    images, skipped, conversions = decode_batch(blobs, min_side=10)
    assert len(images) == len(blobs)
    assert [i for i, im in enumerate(images) if im is None] == [1, 2, 5]
    assert images[4].shape == (32, 24, 3)
    assert skipped == Counter({SkipReason.empty: 1, SkipReason.decode_error: 1, SkipReason.too_small: 1})
    assert skipped["empty"] == 1  # SkipReason is a str enum: plain strings work as keys
    assert conversions == Counter({"grayscale": 2, "exif_rotated": 1, "cmyk": 1})
