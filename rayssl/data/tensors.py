"""uint8 pixel batches -> normalised float tensors, as every backbone here is fed (pure PyTorch).

Crops travel from the data pipeline as uint8 (N, H, W, 3), a quarter of float32's bytes, and
are normalised on the training device with ImageNet's statistics, which torchvision backbones
(and their exports) expect.
"""

from __future__ import annotations

import functools

import torch

# ImageNet statistics.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

__all__ = ["MEAN", "STD", "pixel_scale", "to_device_async", "to_float_images"]


@functools.lru_cache(maxsize=None)
def pixel_scale(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std in uint8 units, (1, 3, 1, 1) on ``device``: made once per device,
    since a tensor built from Python numbers on a GPU is a host copy that waits for the device."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255.0
    return mean.to(device), std.to(device)


def to_float_images(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W).

    Permuting an NHWC tensor gives NCHW *in channels_last memory* for free, which is the
    layout convolutions prefer on GPUs; ``contiguous()`` is only forced when asked.
    """
    mean, std = pixel_scale(x.device)
    y = (x.permute(0, 3, 1, 2).float() - mean) / std
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def to_device_async(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, queued behind the device's
    work instead of waiting for it (a copy from pageable memory synchronises the stream)."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)
