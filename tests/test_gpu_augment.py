"""The device multi-crop (rayssl.data.gpu_augment), run on CPU: same crops as the CPU path,
per-sample randomness, and the decode / ship helpers of data.augment_on=device."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rayssl.data.gpu_augment import (
    DeviceMultiCrop,
    check_encoded,
    decode_images,
    device_crop_batches,
    draw_multicrop_params,
)
from rayssl.data.multicrop import MultiCropSpec, multicrop_batch, sample_generators
from rayssl.data.tensors import MEAN, STD

GEOMETRY_ONLY = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _coord_image(h: int, w: int) -> np.ndarray:
    """R encodes the column, G the row, B = 128: a crop's pixels reveal where it was cut."""
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.round(np.arange(w) * 255.0 / (w - 1))[None, :]
    img[..., 1] = np.round(np.arange(h) * 255.0 / (h - 1))[:, None]
    img[..., 2] = 128
    return img


def _to_uint8_scale(x: torch.Tensor) -> np.ndarray:
    """Normalised float (N, 3, S, S) -> values in [0, 255], (N, S, S, 3)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255.0
    return (x * std + mean).permute(0, 2, 3, 1).numpy()


def _area_fraction_from_pixels(crops: np.ndarray, h: int, w: int) -> np.ndarray:
    """Per crop, the fraction of the source covered, read back from the coordinate pixels."""
    r, g = crops[..., 0], crops[..., 1]
    # The outermost sampled pixel centres lie half an output pixel inside the box.
    s = crops.shape[1]
    width = (r.max(axis=(1, 2)) - r.min(axis=(1, 2))) * (w - 1) / 255.0 * s / (s - 1)
    height = (g.max(axis=(1, 2)) - g.min(axis=(1, 2))) * (h - 1) / 255.0 * s / (s - 1)
    return width * height / (h * w)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


SPEC = MultiCropSpec(sizes=(32, 16), counts=(2, 3), min_scale=(0.14, 0.05), max_scale=(1.0, 0.14))


def test_same_generator_cuts_the_same_boxes_as_the_cpu_path_in_the_same_order():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48 + 8 * i, 64 - 4 * i, 3), dtype=np.uint8) for i in range(6)]
    for make_rng in (lambda: np.random.default_rng(7), lambda: sample_generators(3, 1, range(6))):
        cpu = multicrop_batch(images, SPEC, make_rng(), return_params=True)
        crops, groups = DeviceMultiCrop(SPEC, "cpu")(images, make_rng(), return_params=True)
        assert [tuple(c.shape) for c in crops] == [(6, 3, s, s) for s in SPEC.crop_sizes]
        assert all(c.dtype == torch.float32 for c in crops)
        j = 0
        for gp in groups:
            boxes = gp.boxes.reshape(6, gp.count, 4)
            flips = gp.photo.flip.reshape(6, gp.count)
            for c in range(gp.count):
                np.testing.assert_array_equal(boxes[:, c].astype(int), cpu[f"crop_{j}_params"][:, :4])
                np.testing.assert_array_equal(flips[:, c], cpu[f"crop_{j}_params"][:, 4].astype(bool))
                j += 1


def test_crop_scale_distribution_read_from_pixels_matches_the_cpu_path():
    """Both paths' output pixels say the same about where and how large the crops are."""
    h, w, n = 60, 90, 160
    spec = MultiCropSpec(sizes=(24, 12), counts=(2, 2), min_scale=(0.14, 0.05), max_scale=(1.0, 0.14),
                         **GEOMETRY_ONLY)
    images = [_coord_image(h, w)] * n
    cpu = multicrop_batch(images, spec, np.random.default_rng(1), return_params=True)
    dev, groups = DeviceMultiCrop(spec, "cpu")(images, np.random.default_rng(2), return_params=True)
    dev_same = DeviceMultiCrop(spec, "cpu")(images, np.random.default_rng(1))
    for j, (lo, hi) in enumerate([(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 2):
        s = spec.crop_sizes[j]
        f_cpu = _area_fraction_from_pixels(cpu[f"crop_{j}"].astype(np.float64), h, w)
        f_dev = _area_fraction_from_pixels(_to_uint8_scale(dev[j]), h, w)
        f_same = _area_fraction_from_pixels(_to_uint8_scale(dev_same[j]), h, w)
        # Same generator: per crop, the device crop covers what the CPU crop covers.
        np.testing.assert_allclose(f_same, f_cpu, atol=0.02 + 0.1 * lo)
        # Independent seeds: the same distribution (KS distance well below its 1% critical
        # value ~ 1.63 * sqrt(2 / n) = 0.18), inside the configured scale range.
        assert _ks(f_dev, f_cpu) < 0.18, j
        assert lo * 0.8 <= f_dev.min() and f_dev.max() <= hi * 1.1 + 2.0 / s
        # Nominal boxes: the aspect ratio stays in (3/4, 4/3) and the area in the range.
        b = groups[0 if j < 2 else 1].boxes
        assert np.all(b[:, 3] / b[:, 2] <= 4 / 3 * 1.1) and np.all(b[:, 3] / b[:, 2] >= 3 / 4 / 1.1)


def test_every_sample_gets_its_own_crop_and_colour_in_one_batch():
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    crops, groups = DeviceMultiCrop(SPEC, "cpu")([img] * 16, np.random.default_rng(5), return_params=True)
    boxes = groups[0].boxes
    assert len({tuple(b) for b in boxes}) > 12  # not one draw for the whole batch
    assert 0 < groups[0].photo.flip.sum() < len(groups[0].photo.flip)
    x = crops[0]
    flat = x.reshape(16, -1)
    # Same source image, different outputs for (almost) every pair of samples.
    dists = torch.cdist(flat, flat)
    assert (dists[~torch.eye(16, dtype=torch.bool)] > 1e-3).float().mean() > 0.95


def test_photometric_ops_match_the_cpu_path():
    """Full-image crops at the image size: only the photometric ops differ between paths."""
    spec = MultiCropSpec(sizes=(24, 24), counts=(2, 2), min_scale=(1.0, 1.0), max_scale=(1.0, 1.0),
                         ratio=(1.0, 1.0), jitter=0.8, jitter_p=1.0, grayscale_p=0.3, blur_p=0.5)
    rng = np.random.default_rng(3)
    # Smooth images (resampling a 24 px image onto 24 px is then exact on both paths).
    base = rng.integers(0, 256, (8, 4, 4, 3)).astype(np.float32)
    images = [np.asarray(Image.fromarray(b.astype(np.uint8)).resize((24, 24), Image.Resampling.BILINEAR))
              for b in base]
    cpu = multicrop_batch(images, spec, np.random.default_rng(11))
    dev = DeviceMultiCrop(spec, "cpu")(images, np.random.default_rng(11))
    for j in range(4):
        d = np.abs(_to_uint8_scale(dev[j]) - cpu[f"crop_{j}"].astype(np.float32))
        assert d.mean() < 1.0 and np.percentile(d, 99) < 3.0, (j, d.mean(), d.max())


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_decode_check_and_worker_batches_keep_the_batch_size():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    good = [_jpeg(im) for im in imgs]
    truncated = good[0][: len(good[0]) // 2]  # a valid header, then half the data
    blobs = good + [b"", b"<html>not an image</html>", _jpeg(imgs[0][:10, :10]), truncated]
    ok, skipped = check_encoded(blobs, min_side=32)
    assert ok == [0, 1, 2, 6]  # the header check cannot see the truncation
    assert dict(skipped) == {"empty": 1, "decode_error": 1, "too_small": 1}

    decoded = decode_images([blobs[i] for i in ok], "cpu", min_side=32)
    assert decoded[3] is None
    ref = np.asarray(Image.open(io.BytesIO(good[1])).convert("RGB"))
    assert torch.equal(decoded[1], torch.from_numpy(ref).permute(2, 0, 1))

    failed = __import__("collections").Counter()
    batch = {"encoded": np.array([blobs[i] for i in ok], dtype=object),
             "key": np.arange(4, dtype=np.uint64), "index": np.arange(4)}
    aug = DeviceMultiCrop(SPEC, "cpu")
    (out,) = list(device_crop_batches([batch], aug, seed=0, epoch=0, min_side=32, failed=failed))
    assert [c.shape[0] for c in out["crops"]] == [4] * SPEC.num_crops  # the bad one was replaced
    assert failed["decode_error"] == 1
    assert torch.equal(out["index"], torch.arange(4))
    # Seeded per sample: the same key gives the same crops whatever the batch around it.
    (again,) = list(device_crop_batches([{"image": np.stack(imgs[:2]), "key": np.array([5, 6], np.uint64)}],
                                        aug, seed=0, epoch=0))
    (alone,) = list(device_crop_batches([{"image": np.stack(imgs[1:2]), "key": np.array([6], np.uint64)}],
                                        aug, seed=0, epoch=0))
    assert torch.allclose(again["crops"][0][1], alone["crops"][0][0])


def test_a_jpeg_nvjpeg_refuses_sends_only_itself_to_the_cpu_decoder(monkeypatch):
    """On CUDA the JPEGs go to nvJPEG in one call; when it refuses one, that call fails whole,
    and the others are decoded by nvJPEG one by one: only the refused image takes the CPU path.
    (nvJPEG is stood in for by a fake that decodes with PIL and refuses one image, the CUDA
    stream by a fake; the 'cuda' device is never touched, as nothing here is copied to it.)"""
    import torchvision.io

    import rayssl.data.gpu_augment as ga

    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    blobs = [_jpeg(im) for im in imgs]
    refused = blobs[1]
    calls = []

    order = []

    class FakeStream:
        def synchronize(self):
            order.append("sync")

    def fake_decode_jpeg(data, mode=None, device=None):
        many = isinstance(data, list)
        calls.append(len(data) if many else 1)
        order.append("decode")
        one = [data] if not many else data
        if any(bytes(d.numpy()) == refused for d in one):
            raise RuntimeError("nvjpeg: unsupported")
        out = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(bytes(d.numpy()))).convert("RGB")).copy())
               .permute(2, 0, 1) for d in one]
        return out if many else out[0]

    cpu_decoded = []
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode_jpeg)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(ga, "decode_image", lambda blob, **kw: (cpu_decoded.append(blob), (None, "x", None))[1])
    out = decode_images(blobs, "cuda", min_side=1)
    assert calls == [3, 1, 1, 1]  # the batched call, then one per image
    # nvJPEG writes from its own stream: the caller's queued work is finished before it starts.
    assert order[:2] == ["sync", "decode"]
    assert cpu_decoded == [refused]  # only the refused JPEG went to the CPU decoder
    for i in (0, 2):
        ref = np.asarray(Image.open(io.BytesIO(blobs[i])).convert("RGB"))
        assert torch.equal(out[i], torch.from_numpy(ref).permute(2, 0, 1))
    assert out[1] is None


def test_draw_params_refuses_a_wrong_number_of_generators():
    with pytest.raises(ValueError, match="one per image"):
        draw_multicrop_params([(10, 10)] * 3, SPEC, sample_generators(0, 0, [1, 2]))
