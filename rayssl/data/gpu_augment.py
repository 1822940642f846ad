"""SwAV multi-crop on a torch device (GPU), batched, with per-sample randomness.

The CPU path (``rayssl.data.multicrop``) augments inside Ray Data tasks; this one runs in
the training worker on the accelerator, so Ray Data only has to ship compressed bytes (or
small uint8 images) and the GPU does the decode and the pixel work. Same semantics:

* the parameters of every crop are drawn on the host with the CPU path's own samplers
  (``sample_crop_params`` for RandomResizedCrop, ``_draw_photometric`` for flip / jitter /
  grayscale / blur), in the same order, so the same generator(s) give exactly the boxes
  and photometric parameters the CPU path would cut -- the two paths draw from one
  distribution by construction, not by imitation;
* geometry: one ``torchvision.ops.roi_align`` call per crop group cuts every box of every
  image and resamples it to the crop side (``sampling_ratio=-1`` averages all source
  pixels of an output bin, i.e. an antialiased downscale like Pillow's bilinear filter);
* photometric ops run on (M, 3, S, S) float batches in [0, 255], each crop with its own
  factors; the per-op subsets are index tensors computed on the host, so nothing here
  waits for the device (no ``nonzero`` / ``.item()``).

torchvision's v2 transforms draw one set of parameters per call (per batch), which is
not SwAV's recipe; kornia is not a dependency. Output: normalised float crops
(B, 3, S, S) per crop index, channels_last on CUDA, in the CPU path's crop order.
Pure PyTorch + numpy: no Ray import.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rayssl.data.decode import decode_image
from rayssl.data.multicrop import MultiCropSpec, sample_crop_params, sample_generators
from rayssl.data.photometric import PhotometricParams, blur_kernel_size, draw_photometric
from rayssl.data.ship import ShipToDevice, check_encoded  # noqa: F401 - re-exported
from rayssl.data.tensors import pixel_scale, to_device_async

__all__ = [
    "DeviceMultiCrop",
    "GroupParams",
    "ShipToDevice",
    "check_encoded",
    "decode_images",
    "device_crop_batch",
    "device_crop_batches",
    "draw_multicrop_params",
    "is_jpeg",
]

class GroupParams(NamedTuple):
    """Every crop of one crop group for a batch of N images (``count`` crops each).

    ``boxes``: float (N * count, 4) as (top, left, height, width) in source pixels,
    image-major (crop c of image i is row ``i * count + c``). ``photo``: the photometric
    parameters of the same rows.
    """

    size: int
    count: int
    boxes: np.ndarray
    photo: PhotometricParams


def draw_multicrop_params(shapes: Sequence[tuple[int, int]], spec: MultiCropSpec,
                          rng: np.random.Generator | Sequence[np.random.Generator]) -> list[GroupParams]:
    """Crop boxes and photometric parameters of a batch, drawn as the CPU path draws them.

    ``shapes``: (H_i, W_i) of each image. ``rng``: one generator for the batch or one per
    image (``multicrop.sample_generators``). The draw order is the CPU path's: per group,
    every box of every image, then that group's photometric parameters (one draw of
    N * count rows for a batch generator, ``count`` rows per image otherwise), so
    ``multicrop_batch(images, spec, rng)`` with an equal generator cuts the same boxes.
    """
    n = len(shapes)
    per_image = not isinstance(rng, np.random.Generator)
    rngs = list(rng) if per_image else None
    if per_image and len(rngs) != n:
        raise ValueError(f"got {len(rngs)} generators for {n} images: give one per image")
    out = []
    for size, count, lo, hi in zip(spec.sizes, spec.counts, spec.min_scale, spec.max_scale):
        boxes = np.empty((n * count, 4), dtype=np.float32)
        for i, (h, w) in enumerate(shapes):
            r = rngs[i] if per_image else rng
            for c in range(count):
                boxes[i * count + c] = sample_crop_params(int(h), int(w), (lo, hi), spec.ratio, r)
        if per_image:
            drawn = [draw_photometric(count, spec, r) for r in rngs]
            photo = PhotometricParams(*(np.concatenate(p) for p in zip(*drawn)))
        else:
            photo = draw_photometric(n * count, spec, rng)
        out.append(GroupParams(int(size), int(count), boxes, photo))
    return out


# ----------------------------------------------------------------------------- decode


def is_jpeg(blob: bytes) -> bool:
    return len(blob) > 3 and blob[:3] == b"\xff\xd8\xff"


def decode_images(blobs: Sequence[bytes], device: torch.device | str, min_side: int = 1) -> list[torch.Tensor | None]:
    """Encoded images -> uint8 (3, H, W) tensors on ``device`` (None where unusable).

    On CUDA, JPEGs are decoded by nvJPEG in one batched ``torchvision.io.decode_jpeg``
    call; everything else (PNG, CMYK, EXIF-rotated, a JPEG nvJPEG refuses) goes through
    the CPU decoder of the Ray Data path (``rayssl.data.decode.decode_image``: the same
    conversions and skips) and is copied over. Off CUDA every image takes that CPU path.
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(blobs)
    cpu_idx = list(range(len(blobs)))
    if device.type == "cuda":
        from torchvision.io import ImageReadMode, decode_jpeg

        gpu_idx = [i for i, b in enumerate(blobs) if is_jpeg(b) and not _exif_rotated(b)]
        if gpu_idx:
            data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu_idx]
            # nvJPEG writes its outputs (allocated on this stream) from a stream of its own that
            # does not wait for this one: a block freed here while queued kernels still read it
            # would be overwritten. Let this stream's queued work finish first.
            torch.cuda.current_stream(device).synchronize()
            try:
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one JPEG nvJPEG refuses fails the whole call: one by one, so
                decoded = [_decode_one(d, device) for d in data]  # only the refused go to the CPU
            for i, img in zip(gpu_idx, decoded):
                if img is not None and min(img.shape[-2:]) >= min_side:
                    out[i] = img
        cpu_idx = [i for i in cpu_idx if out[i] is None]
    for i in cpu_idx:
        arr, _reason, _conv = decode_image(blobs[i], min_side=min_side)
        if arr is not None:
            out[i] = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1).to(device)
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One JPEG by nvJPEG, or None where it refuses it (the CPU decoder then tries)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _exif_rotated(blob: bytes) -> bool:
    """True when a JPEG carries an EXIF orientation other than 1 (nvJPEG ignores EXIF)."""
    if b"Exif" not in blob[:65536]:
        return False
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # noqa: BLE001 - undecidable: let the CPU decoder deal with it
        return True


# ----------------------------------------------------------------------------- pixels


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(M, 3, S, S) -> (M, 1, S, S) luma, ITU-R 601-2 (as the CPU path)."""
    return x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return ((x - other) * f.view(-1, 1, 1, 1) + other).clamp_(0.0, 255.0)


def _brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 255.0)


def _contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x, f):
    return _blend(x, _gray(x), f)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each sample by ``shift`` turns (the CPU path's formulas)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = torch.where(chroma > 0, 1.0 / chroma.clamp_min(1e-12), torch.zeros_like(chroma))
    h = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h = torch.remainder(h + 6.0 * shift.view(-1, 1, 1), 6.0)
    chans = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h + n, 6.0)
        k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        chans.append(maxc - k * chroma)
    return torch.stack(chans, dim=1).clamp_(0.0, 255.0)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Separable Gaussian with one sigma per sample, reflect padding. (M, 3, S, S)."""
    r = ksize // 2
    if r == 0 or x.shape[0] == 0:
        return x
    m, c, s, _ = x.shape
    taps = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
    w = (w / w.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (M*C, K)
    y = F.pad(x.reshape(1, m * c, s, s), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, w.view(m * c, 1, 1, ksize), groups=m * c)  # along W
    y = F.conv2d(y, w.view(m * c, 1, ksize, 1), groups=m * c)  # along H
    return y.view(m, c, s, s)


class DeviceMultiCrop:
    """``spec``'s multi-crop on ``device``: images (uint8) -> list of normalised crops.

    ``DeviceMultiCrop(spec, device)(images, rng)`` with ``images`` a uint8 tensor
    (N, H, W, 3) (all one size) or a list of uint8 (3, H_i, W_i) tensors, returns
    ``spec.num_crops`` float tensors (N, 3, s_j, s_j), normalised with the ImageNet
    statistics, crop j as the CPU path's ``crop_j``. ``return_params=True`` also returns
    the drawn :class:`GroupParams` (for tests and debugging).
    """

    def __init__(self, spec: MultiCropSpec, device: torch.device | str, channels_last: bool | None = None,
                 max_canvas_pixels: int = 64 * 2**20):
        if not isinstance(spec, MultiCropSpec):
            raise TypeError(f"spec must be a MultiCropSpec, got {type(spec).__name__}")
        self.spec = spec
        self.device = torch.device(device)
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.max_canvas_pixels = int(max_canvas_pixels)  # bounds the padded float canvas per chunk
        self.mean, self.std = pixel_scale(self.device)

    def __call__(self, images, rng, return_params: bool = False):
        imgs = self._as_list(images)
        if not imgs:
            raise ValueError("DeviceMultiCrop needs at least one image")
        shapes = [(int(im.shape[-2]), int(im.shape[-1])) for im in imgs]
        groups = draw_multicrop_params(shapes, self.spec, rng)
        crops: list[torch.Tensor] = []
        for gp in groups:
            x = self._cut(imgs, shapes, gp)  # (N*count, 3, S, S) float in [0, 255], image-major
            x = self._photometric(x, gp)
            x = (x - self.mean) / self.std
            x = x.view(len(imgs), gp.count, 3, gp.size, gp.size)
            for c in range(gp.count):
                xc = x[:, c]
                crops.append(xc.contiguous(memory_format=torch.channels_last) if self.channels_last
                             else xc.contiguous())
        return (crops, groups) if return_params else crops

    # -- steps ---------------------------------------------------------------------------
    def _as_list(self, images) -> list[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[-1] != 3:
                raise ValueError(f"expected uint8 images (N, H, W, 3), got shape {tuple(images.shape)}")
            images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            return list(images)
        out = []
        for im in images:
            if isinstance(im, np.ndarray):
                im = torch.from_numpy(np.require(im, requirements=["C", "W"])).permute(2, 0, 1)
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"expected uint8 images (3, H, W), got shape {tuple(im.shape)}")
            out.append(im.to(self.device, non_blocking=True))
        return out

    def _to_device(self, arrays: list[np.ndarray], dtype) -> list[torch.Tensor]:
        """Host arrays -> device tensors in one (pinned, asynchronous on CUDA) copy.

        Pageable host-to-device copies synchronise the stream on CUDA; packing every small
        parameter array into one pinned buffer keeps the host ahead of the device.
        """
        flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
        host = torch.from_numpy(np.concatenate(flat).astype(dtype, copy=False)) if flat else torch.empty(0)
        dev = to_device_async(host, self.device)
        out, at = [], 0
        for a, f in zip(arrays, flat):
            out.append(dev[at:at + f.size].view(*a.shape))
            at += f.size
        return out

    def _cut(self, imgs: list[torch.Tensor], shapes, gp: GroupParams) -> torch.Tensor:
        """RandomResizedCrop of every box: (N*count, 3, S, S) float32 in [0, 255]."""
        from torchvision.ops import roi_align

        n = len(imgs)
        out = torch.empty((n * gp.count, 3, gp.size, gp.size), device=self.device)
        same = len(set(shapes)) == 1
        hmax, wmax = max(h for h, _ in shapes), max(w for _, w in shapes)
        chunk = n if same else max(1, self.max_canvas_pixels // (hmax * wmax))
        # roi_align's boxes are (batch index, x1, y1, x2, y2) in continuous pixel-edge
        # coordinates with aligned=True: box [left, left + width) covers those pixels.
        # The batch index is relative to the chunk's canvas.
        b = gp.boxes
        image = np.repeat(np.arange(n), gp.count)
        rois = np.stack([image % chunk, b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], axis=1)
        (rois_t,) = self._to_device([rois.astype(np.float32)], np.float32)
        for a in range(0, n, chunk):
            part = imgs[a:a + chunk]
            if same:
                canvas = torch.stack(part).float()
            else:
                # Pad each image to a common canvas by edge replication: bilinear samples
                # next to an image's own border then read that border, as on the CPU.
                canvas = torch.stack([F.pad(im.float()[None], (0, wmax - im.shape[-1], 0, hmax - im.shape[-2]),
                                            mode="replicate")[0] for im in part])
            rows = slice(a * gp.count, (a + len(part)) * gp.count)
            out[rows] = roi_align(canvas, rois_t[rows], output_size=(gp.size, gp.size), spatial_scale=1.0,
                                  sampling_ratio=-1, aligned=True)
        return out.clamp_(0.0, 255.0)

    def _photometric(self, x: torch.Tensor, gp: GroupParams) -> torch.Tensor:
        p = gp.photo
        # Which crops each op touches, decided on the host: index tensors, no device sync.
        subsets = [np.flatnonzero(p.do_jitter & (p.order[:, step] == op_id))
                   for step in range(4) for op_id in range(len(_JITTER_OPS))]
        subsets += [np.flatnonzero(p.do_gray), np.flatnonzero(p.do_blur), p.flip.astype(np.int64)]
        *idx, flip = self._to_device(subsets, np.int64)
        factors, sigma = self._to_device([p.factors.astype(np.float32), p.sigma[p.do_blur].astype(np.float32)],
                                         np.float32)
        x = torch.where(flip.view(-1, 1, 1, 1).bool(), x.flip(-1), x)
        for k, sub in enumerate(subsets[:-3]):
            if sub.size:
                op_id = k % len(_JITTER_OPS)
                i = idx[k]
                x[i] = _JITTER_OPS[op_id](x[i], factors[i, op_id])
        gray, blur = idx[-2], idx[-1]
        if subsets[-3].size:
            x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
        ksize = blur_kernel_size(gp.size)
        if ksize > 1 and subsets[-2].size:
            x[blur] = _gaussian_blur(x[blur], sigma, ksize)
        return x.clamp_(0.0, 255.0)


def device_crop_batches(batches: Iterable[dict], augment: DeviceMultiCrop, *, seed: int, epoch: int,
                        min_side: int = 1, failed: Counter | None = None) -> Iterator[dict]:
    """Worker side of ``augment_on = "device"``: shipped numpy batches -> device crops
    (``device_crop_batch`` of each; a batch with no decodable image is dropped)."""
    for batch in batches:
        out = device_crop_batch(batch, augment, seed=seed, epoch=epoch, min_side=min_side, failed=failed)
        if out is not None:
            yield out


def device_crop_batch(batch: dict, augment: DeviceMultiCrop, *, seed: int, epoch: int, min_side: int = 1,
                      failed: Counter | None = None) -> dict | None:
    """One shipped numpy batch -> its crops on ``augment.device`` (None: no image decoded).

    ``batch`` holds ``key`` (uint64 augmentation keys) and either ``encoded`` (bytes) or
    ``image`` (uint8 (N, H, W, 3)). Returns ``{"crops": [normalised float (N, 3, s_j, s_j)
    per crop], <other numeric columns as tensors on the device>}``. Crops are seeded per
    sample by (seed, epoch, key), as the CPU pipeline seeds them. An image that fails to
    decode on the worker (truncated after a valid header) is replaced by another image of
    the same batch, so every rank keeps the batch size the collectives expect; the
    replacements are counted in ``failed["decode_error"]``.
    """
    keys = [int(k) for k in batch["key"]]
    if "encoded" in batch:
        images = decode_images([bytes(b) for b in batch["encoded"]], augment.device, min_side=min_side)
        ok = [i for i, im in enumerate(images) if im is not None]
        if not ok:
            if failed is not None:
                failed["decode_error"] += len(images)
            return None
        for n, i in enumerate([i for i, im in enumerate(images) if im is None]):
            j = ok[n % len(ok)]
            images[i], keys[i] = images[j], keys[j]
            if failed is not None:
                failed["decode_error"] += 1
    else:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))
    crops = augment(images, sample_generators(seed, epoch, keys))
    out = {"crops": crops}
    for k, v in batch.items():
        if k in ("key", "encoded", "image"):
            continue
        arr = np.asarray(v)
        if arr.dtype.kind in "biuf":
            out[k] = torch.from_numpy(np.ascontiguousarray(arr)).to(augment.device, non_blocking=True)
    return out
