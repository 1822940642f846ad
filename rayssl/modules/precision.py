"""Which float precision a device trains and infers in (pure PyTorch).

``run.precision=auto`` resolves here, for the training step (``rayssl.engine``) and for
frozen-feature inference (``rayssl.eval.features``) alike. ``bf16_unsafe_convs`` finds the
convolutions where a CPU's bf16 training is wrong (see there); the engine then trains in fp32.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["bf16_unsafe_convs", "cpu_has_bf16_matmul", "resolve_precision"]


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX: Sapphire Rapids and
    later). Without it bf16 autocast on a CPU is emulated and slower than fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        return bool(probe())
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_bf16" in f.read()
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device, bf16_supported: bool | None = None) -> str:
    """``run.precision`` on ``device`` -> fp32 | bf16 | fp16. ``auto``: bf16 on a GPU that has it
    natively (Ampere and later), fp16 on an older GPU (V100, T4); on a CPU, bf16 where it has
    bf16 matrix units (AMX; there the default run's step, in bf16 with channels_last, was 1.9x
    faster than fp32: docs/performance.md), else fp32.
    ``bf16_supported``: the device's answer, when known (tests)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if bf16_supported else "fp16"
    if device.type == "cpu":
        return "bf16" if (cpu_has_bf16_matmul() if bf16_supported is None else bf16_supported) else "fp32"
    return "fp32"


def bf16_unsafe_convs(net: nn.Module, size: int) -> list[str]:
    """Names of ``net``'s strided convolutions (kernel and stride > 1) that a ``size`` x ``size``
    image reaches at 1 x 1: where oneDNN's bf16 weight gradient on a CPU is wrong.

    Measured with torch 2.14.1 on the AVX512-BF16 and the AMX kernels alike: the weight gradient
    of a 3x3, stride-2, padded convolution of a 1 x 1 input came out NaN in 1-85% of steps
    (non-deterministically; never in fp32, never with oneDNN off, never for a 2 x 2 input or at
    stride 1). A ResNet meets it with the standard stem on crops under 32 px (16 px crops reach
    layer3 at 1 x 1). Found with one eval-mode forward of a zero image, hooks on the convolutions;
    the top module's own compiled call, if any, is bypassed."""
    hits: list[str] = []

    def watch(name: str):
        def hook(_module, args):
            if args and args[0].dim() == 4 and args[0].shape[-2:] == (1, 1):
                hits.append(name)
        return hook

    handles = [m.register_forward_pre_hook(watch(name)) for name, m in net.named_modules()
               if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and max(m.kernel_size) > 1]
    if not handles:
        return []
    was_training = net.training
    net.eval()
    try:
        first = next(net.parameters())
        with torch.no_grad():
            net.forward(torch.zeros(1, 3, size, size, dtype=first.dtype, device=first.device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return hits
