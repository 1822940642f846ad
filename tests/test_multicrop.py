"""Tests for the CPU multi-crop augmentation (rayssl.data.multicrop)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from rayssl.data import photometric as ph
from rayssl.data.multicrop import (
    CropParams,
    MultiCrop,
    MultiCropSpec,
    blur_kernel_size,
    multicrop_batch,
    sample_crop_params,
)

SMALL = dict(sizes=(32, 16), counts=(2, 4), min_scale=(0.14, 0.05), max_scale=(1.0, 0.14))
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _image(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """A textured, colourful image: a smooth gradient plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(-30, 31, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _no_photometric(**kw) -> MultiCropSpec:
    """Spec with jitter, grayscale and blur off (flip as given)."""
    return MultiCropSpec(**{"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, **kw})


# ---------------------------------------------------------------------------- spec


def test_spec_properties_and_paper_recipe():
    spec = MultiCropSpec(**SMALL)
    assert spec.num_crops == 6
    assert spec.crop_sizes == [32, 32, 16, 16, 16, 16]
    assert spec.max_size == 32

    paper = MultiCropSpec.swav_paper()
    assert paper.sizes == (224, 96) and paper.counts == (2, 6)
    assert paper.min_scale == (0.14, 0.05) and paper.max_scale == (1.0, 0.14)
    assert paper.num_crops == 8 and paper.crop_sizes == [224] * 2 + [96] * 6
    assert (paper.jitter, paper.jitter_p, paper.grayscale_p, paper.blur_p) == (0.8, 0.8, 0.2, 0.5)


def test_spec_accepts_lists_and_stays_hashable():
    spec = MultiCropSpec(sizes=[32, 16], counts=[2, 4], min_scale=[0.14, 0.05], max_scale=[1.0, 0.14])
    assert spec == MultiCropSpec(**SMALL)
    hash(spec)


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(counts=(2,)), "counts"),
        (dict(min_scale=(0.14,)), "min_scale"),
        (dict(max_scale=(1.0, 0.14, 0.1)), "max_scale"),
        (dict(sizes=(32, 0)), "sizes"),
        (dict(counts=(2, 0)), "counts"),
        (dict(counts=(1, 4)), "counts[0]"),
        (dict(min_scale=(0.0, 0.05)), "min_scale"),
        (dict(max_scale=(1.2, 0.14)), "max_scale[0]"),
        (dict(min_scale=(0.14, 0.2)), "max_scale[1]"),
        (dict(jitter=-0.1), "jitter"),
        (dict(jitter_p=1.5), "jitter_p"),
        (dict(grayscale_p=-0.1), "grayscale_p"),
        (dict(blur_p=2.0), "blur_p"),
        (dict(flip_p=-1.0), "flip_p"),
        (dict(blur_sigma=(2.0, 0.1)), "blur_sigma"),
        (dict(ratio=(0.0, 1.0)), "ratio"),
    ],
)
def test_spec_validation_names_the_field(override, field):
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        MultiCropSpec(**{**SMALL, **override})


# ----------------------------------------------------------------- crop sampler


def _expected_area_fraction(h: int, w: int, scale, ratio, grid: int = 2000) -> float:
    """E[area fraction] of sample_crop_params, ignoring integer rounding.

    One try draws s ~ U(scale) and log r ~ U(log ratio); it is accepted when the box
    fits: s * r <= w / h and s / r <= h / w. After 10 rejections the centred fallback
    box (clamped ratio) is used.
    """
    s = np.linspace(scale[0], scale[1], grid)[:, None]
    r = np.exp(np.linspace(math.log(ratio[0]), math.log(ratio[1]), grid))[None, :]
    ok = (s * r <= w / h) & (s / r <= h / w)
    p_acc = ok.mean()
    e_acc = (s * ok).mean() / p_acc if p_acc > 0 else 0.0
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fallback = (w * round(w / ratio[0])) / (h * w)
    elif in_ratio > ratio[1]:
        fallback = (h * round(h * ratio[1])) / (h * w)
    else:
        fallback = 1.0
    q10 = (1.0 - p_acc) ** 10
    return (1.0 - q10) * e_acc + q10 * fallback


@pytest.mark.parametrize(
    "h, w, scale",
    [
        (1000, 1000, (0.14, 1.0)),  # large crops: rejection near s = 1 biases the mean down
        (1000, 1000, (0.05, 0.14)),  # small crops: never rejected, mean = midpoint
        (400, 1200, (0.14, 1.0)),  # wide image: most tries rejected, fallback box common
    ],
)
def test_crop_area_distribution_matches_analytic_expectation(h, w, scale):
    rng = np.random.default_rng(123)
    n = 20000
    boxes = np.array([sample_crop_params(h, w, scale, RATIO, rng) for _ in range(n)])
    top, left, ch, cw = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()
    frac = ch * cw / (h * w)
    # Integer rounding of each side moves the area by at most ~1 px per side.
    slack = 2.0 / math.sqrt(scale[0] * h * w)
    in_range = (frac >= scale[0] * (1 - slack)) & (frac <= scale[1] * (1 + slack))
    ratio_ok = (cw / ch >= RATIO[0] * (1 - slack)) & (cw / ch <= RATIO[1] * (1 + slack))
    expected = _expected_area_fraction(h, w, scale, RATIO)
    if w == h:
        assert in_range.all()
        assert ratio_ok.all()
    else:
        # Fallback boxes (400 x 533 here) may lie outside the scale range, never outside
        # the ratio range; everything else must be in range.
        fallback = (ch == 400) & (cw == round(400 * RATIO[1]))
        assert fallback.any()
        assert in_range[~fallback].all()
        assert ratio_ok.all()
    # Standard error of the mean is < 0.002 for n = 20000.
    assert abs(frac.mean() - expected) < 0.008, (frac.mean(), expected)
    if scale == (0.05, 0.14):
        # No rejection: the area fraction is uniform, so its quartiles are evenly spaced.
        q = np.quantile(frac, [0.25, 0.5, 0.75])
        np.testing.assert_allclose(q, [0.0725, 0.095, 0.1175], atol=0.003)
        # ...and the aspect ratio is log-uniform in (3/4, 4/3).
        log_r = np.log(cw / ch)
        half = math.log(4.0 / 3.0)
        np.testing.assert_allclose(np.quantile(log_r, [0.25, 0.5, 0.75]), [-half / 2, 0.0, half / 2], atol=0.015)


def test_crop_sampler_falls_back_to_centre_crop():
    rng = np.random.default_rng(0)
    # Scale 1 in a 100 x 300 image never fits with ratio <= 4/3: fallback every time.
    for _ in range(5):
        assert sample_crop_params(100, 300, (1.0, 1.0), RATIO, rng) == (0, 83, 100, 133)
    # A tall image clamps the other way.
    assert sample_crop_params(300, 100, (1.0, 1.0), RATIO, rng) == (83, 0, 133, 100)
    # A square image outside a ratio range of (1.2, 1.3) is clamped to ratio 1.2.
    assert sample_crop_params(50, 50, (1.0, 1.0), (1.2, 1.3), rng) == (4, 0, 42, 50)


# --------------------------------------------------------------------- outputs


def test_output_count_shapes_dtypes():
    spec = MultiCropSpec(**SMALL)
    crops = MultiCrop(spec)(_image(), np.random.default_rng(0))
    assert len(crops) == spec.num_crops
    for crop, size in zip(crops, spec.crop_sizes):
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8

    imgs = [_image(64, 64, 1), _image(48, 80, 2), _image(100, 37, 3)]
    out = multicrop_batch(imgs, spec, np.random.default_rng(0))
    assert sorted(out) == sorted(f"crop_{j}" for j in range(spec.num_crops))
    for j, size in enumerate(spec.crop_sizes):
        assert out[f"crop_{j}"].shape == (3, size, size, 3)
        assert out[f"crop_{j}"].dtype == np.uint8
        assert out[f"crop_{j}"].flags.c_contiguous


def test_paper_recipe_on_a_real_sized_image():
    spec = MultiCropSpec.swav_paper()
    out = multicrop_batch([_image(300, 400)], spec, np.random.default_rng(0))
    assert [out[f"crop_{j}"].shape[1] for j in range(8)] == [224, 224] + [96] * 6


def test_per_sample_randomness_and_seed_determinism():
    spec = MultiCropSpec(**SMALL)
    img = _image()
    crops = MultiCrop(spec)(img, np.random.default_rng(7))
    assert not np.array_equal(crops[0], crops[1])
    assert not np.array_equal(crops[2], crops[3])

    # The same image twice in a batch: each copy draws its own parameters.
    out = multicrop_batch([img, img], spec, np.random.default_rng(7), return_params=True)
    for j in range(spec.num_crops):
        assert not np.array_equal(out[f"crop_{j}"][0], out[f"crop_{j}"][1])
    boxes = np.stack([out[f"crop_{j}_params"] for j in range(spec.num_crops)])  # (6, 2, 5)
    assert not np.array_equal(boxes[:, 0], boxes[:, 1])

    # Same seed, same output; different seed, different output.
    again = multicrop_batch([img, img], spec, np.random.default_rng(7), return_params=True)
    other = multicrop_batch([img, img], spec, np.random.default_rng(8))
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])
    assert not np.array_equal(out["crop_0"], other["crop_0"])


def test_single_image_call_matches_batch_of_one():
    spec = MultiCropSpec(**SMALL)
    img = _image()
    crops, params = MultiCrop(spec)(img, np.random.default_rng(3), return_params=True)
    batch = multicrop_batch([img], spec, np.random.default_rng(3), return_params=True)
    for j, crop in enumerate(crops):
        np.testing.assert_array_equal(crop, batch[f"crop_{j}"][0])
        assert params[j] == CropParams(*map(int, batch[f"crop_{j}_params"][0][:4]), bool(batch[f"crop_{j}_params"][0][4]))


def test_geometry_only_crop_equals_resized_box():
    """With photometric ops off, each crop is exactly the recorded box, resized."""
    from PIL import Image

    spec = _no_photometric(**SMALL, flip_p=0.5)
    img = _image(60, 90)
    crops, params = MultiCrop(spec)(img, np.random.default_rng(5), return_params=True)
    pil = Image.fromarray(img)
    for crop, size, p in zip(crops, spec.crop_sizes, params):
        ref = np.asarray(
            pil.resize((size, size), Image.Resampling.BILINEAR, box=(p.left, p.top, p.left + p.width, p.top + p.height))
        )
        np.testing.assert_array_equal(crop, ref[:, ::-1] if p.flipped else ref)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_flip_mirrors(flip_p):
    # Whole-image crops at the native size make the geometry the identity.
    spec = _no_photometric(sizes=(32,), counts=(4,), min_scale=(1.0,), max_scale=(1.0,), ratio=(1.0, 1.0), flip_p=flip_p)
    img = _image(32, 32)
    assert not np.array_equal(img, img[:, ::-1])  # asymmetric
    crops, params = MultiCrop(spec)(img, np.random.default_rng(0), return_params=True)
    expected = img[:, ::-1] if flip_p else img
    for crop, p in zip(crops, params):
        np.testing.assert_array_equal(crop, expected)
        assert p.flipped == bool(flip_p)


def test_flip_probability_is_per_crop():
    spec = _no_photometric(sizes=(32,), counts=(2,), min_scale=(1.0,), max_scale=(1.0,), ratio=(1.0, 1.0))
    img = _image(32, 32)
    out = multicrop_batch([img] * 500, spec, np.random.default_rng(0), return_params=True)
    flipped = np.concatenate([out["crop_0_params"][:, 4], out["crop_1_params"][:, 4]]).astype(bool)
    assert 0.44 < flipped.mean() < 0.56
    # Independent per crop: the two crops of one image disagree about half the time.
    assert 0.4 < (out["crop_0_params"][:, 4] != out["crop_1_params"][:, 4]).mean() < 0.6
    crops = np.concatenate([out["crop_0"], out["crop_1"]])
    np.testing.assert_array_equal(crops[flipped], np.broadcast_to(img[:, ::-1], crops[flipped].shape))
    np.testing.assert_array_equal(crops[~flipped], np.broadcast_to(img, crops[~flipped].shape))


def test_grayscale_p1_gives_equal_channels():
    spec = MultiCropSpec(**SMALL, grayscale_p=1.0)  # jitter and blur stay on
    for crop in MultiCrop(spec)(_image(), np.random.default_rng(0)):
        np.testing.assert_array_equal(crop[..., 0], crop[..., 1])
        np.testing.assert_array_equal(crop[..., 1], crop[..., 2])
    # ...and with the default p=0.2 most crops keep their colour.
    out = multicrop_batch([_image()] * 50, MultiCropSpec(**SMALL), np.random.default_rng(0))
    colour = [not np.array_equal(c[..., 0], c[..., 1]) for j in range(6) for c in out[f"crop_{j}"]]
    assert 0.7 < np.mean(colour) < 0.9


def test_jitter_changes_colours_and_blur_smooths():
    base = _no_photometric(**SMALL, flip_p=0.0)
    img = _image()
    plain = multicrop_batch([img] * 8, base, np.random.default_rng(1))
    jittered = multicrop_batch([img] * 8, _no_photometric(**SMALL, flip_p=0.0, jitter_p=1.0), np.random.default_rng(1))
    blurred = multicrop_batch([img] * 8, _no_photometric(**SMALL, flip_p=0.0, blur_p=1.0, blur_sigma=(1.5, 2.0)), np.random.default_rng(1))
    # Same RNG stream, so the geometry is identical and only the colour ops differ.
    a, b, c = plain["crop_0"].astype(float), jittered["crop_0"].astype(float), blurred["crop_0"].astype(float)
    assert np.abs(a - b).mean(axis=(1, 2, 3)).min() > 1.0
    # Blur lowers the high-frequency energy of every crop.
    def hf(x):
        return np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
    assert (hf(c) < 0.8 * hf(a)).all()


# ------------------------------------------------ photometric ops vs torchvision


def _tv():
    return pytest.importorskip("torchvision.transforms.v2.functional")


def test_colour_ops_match_torchvision():
    import torch

    F = _tv()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(5, 3, 12, 12)).astype(np.float32)
    x[0, :, :4] = 128.0  # grey pixels (zero chroma)
    x[1, 0] = x[1, 1]  # ties between channels
    f = np.array([0.2, 0.7, 1.0, 1.4, 1.8], dtype=np.float32)
    shift = np.array([-0.2, -0.05, 0.0, 0.1, 0.2], dtype=np.float32)
    t = torch.from_numpy(x / 255.0)
    cases = [
        (ph._brightness, F.adjust_brightness, f),
        (ph._contrast, F.adjust_contrast, f),
        (ph._saturation, F.adjust_saturation, f),
        (ph._hue, F.adjust_hue, shift),
    ]
    for ours, theirs, params in cases:
        got = ours(x.copy(), params)
        ref = torch.stack([theirs(t[i], float(params[i])) for i in range(len(params))]).numpy() * 255.0
        np.testing.assert_allclose(got, ref, atol=0.05, err_msg=ours.__name__)


def test_blur_matches_torchvision_gaussian_blur():
    import torch

    F = _tv()
    rng = np.random.default_rng(0)
    for size in (16, 32, 96):
        k = blur_kernel_size(size)
        x = rng.uniform(0, 255, size=(3, 3, size, size)).astype(np.float32)
        sigma = np.array([0.1, 0.9, 2.0])
        got = ph._gaussian_blur(x, sigma, k)
        ref = torch.stack(
            [F.gaussian_blur(torch.from_numpy(x[i]), [k, k], [float(sigma[i])] * 2) for i in range(3)]
        ).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-2, err_msg=f"size {size}")


def test_blur_kernel_is_about_ten_percent_and_odd():
    assert blur_kernel_size(224) == 23  # SimCLR's kernel for 224
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(16) == 3  # tiny crops still get a real blur
    for s in range(2, 300):
        k = blur_kernel_size(s)
        assert k % 2 == 1 and k // 2 < s


def test_rejects_bad_images():
    crop = MultiCrop(MultiCropSpec(**SMALL))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shape"):
        crop(np.zeros((8, 8), np.uint8), rng)
    with pytest.raises(ValueError, match="uint8"):
        crop(np.zeros((8, 8, 3), np.float32), rng)
    with pytest.raises(ValueError, match="at least one"):
        multicrop_batch([], MultiCropSpec(**SMALL), rng)
