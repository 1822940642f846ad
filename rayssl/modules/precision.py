"""Which float precision a device trains and infers in (pure PyTorch).

``run.precision=auto`` resolves here, for the training step (``rayssl.engine``) and for
frozen-feature inference (``rayssl.eval.features``) alike.
"""

from __future__ import annotations

import torch

__all__ = ["cpu_has_bf16_matmul", "resolve_precision"]


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
