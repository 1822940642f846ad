"""The step fed by ``augment_on=device`` in one process, no Ray: what the GPU adds per batch.

With ``data.augment_on=device`` the Ray Data tasks only read the encoded JPEGs; the training
worker decodes them (nvJPEG on CUDA) and cuts the multi-crop on its own device
(``rayssl.data.gpu_augment.device_crop_batch``, the function the worker's feed calls) before
``Engine.train_step``; on CUDA the next batches are decoded and cropped by a background thread
on a side stream while the step runs (``rayssl.data.prefetch``). This measures that worker side
alone: encoded JPEG scenes held in memory, then, alternated over ``repeats``, ``steps`` bare
steps on ready crops, ``steps`` steps each fed by decoding and cropping its own batch first
(serial: how the worker fed it until 2026-12-05), and ``steps`` fed as the worker feeds them
now. What Ray adds (reading, shipping bytes between processes) is not in it: the ratio is the
pipeline's ceiling with device augmentation, the figure a GPU can give without Ray installed.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from rayssl.bench.step import StepBench, timed
from rayssl.config import Config
from rayssl.data.formats import encode_image
from rayssl.data.gpu_augment import DeviceMultiCrop, device_crop_batch
from rayssl.data.multicrop import crop_spec
from rayssl.data.prefetch import ahead
from rayssl.data.scenes import generate_batch
from rayssl.engine.lockstep import lockstep

__all__ = ["encoded_scenes", "measure_device_fed"]


def encoded_scenes(count: int, size: int, seed: int = 0) -> list[bytes]:
    """``count`` generated scenes of ``size`` px as JPEG bytes."""
    return [encode_image(image) for image in generate_batch(range(count), seed=seed, size=size)["image"]]


def measure_device_fed(cfg: Config, device: torch.device, steps: int, warmup: int, repeats: int,
                       scene_size: int, batches: int = 4) -> dict:
    """images/s of the bare step, of the step fed as the worker feeds it on CUDA (the next batch
    decoded and cropped by a background thread while the step runs: ``rayssl.data.prefetch``)
    and fed serially (decode + crop, then the step), medians over ``repeats``; the decode + crop
    time per batch alone, and the ratios to the bare step."""
    sb = StepBench(cfg, device)
    b = cfg.run.batch_size
    blobs = encoded_scenes(b * batches, scene_size, seed=cfg.run.seed)
    rows = [{"key": np.arange(i * b, (i + 1) * b, dtype=np.uint64), "encoded": blobs[i * b:(i + 1) * b]}
            for i in range(batches)]
    augment = DeviceMultiCrop(crop_spec(cfg.data), device, channels_last=sb.engine.channels_last)
    epoch = [0]

    def crops(i: int) -> list[torch.Tensor]:
        epoch[0] += 1  # new crops every call, as every epoch draws them anew
        return device_crop_batch(rows[i % batches], augment, seed=cfg.run.seed, epoch=epoch[0])["crops"]

    def serial() -> None:
        for i in range(steps):
            sb.step(crops(i))

    def prefetched() -> None:  # as the worker: depth 2 (rayssl.data.feed), lockstep's look-ahead
        for c in lockstep(ahead(range(steps), crops, device, depth=2)):
            sb.step(c)

    for i in range(max(1, warmup)):
        sb.step(crops(i))
    runs: dict[str, list[float]] = {"bare": [], "serial": [], "prefetched": []}
    crop_ms = []
    for _ in range(repeats):
        for name, fn in (("bare", lambda: [sb.step() for _ in range(steps)]), ("serial", serial),
                         ("prefetched", prefetched)):
            runs[name].append(b * steps / timed(fn, device))
        crop_ms.append(1000 * statistics.median(timed(lambda: crops(i), device) for i in range(steps)))
    ips = {k: statistics.median(v) for k, v in runs.items()}
    return {"augment_on": "device", "decode": "nvJPEG" if device.type == "cuda" else "CPU (PIL)",
            "scene_size": scene_size, "images_per_s": round(ips["prefetched"], 2),
            "runs_images_per_s": [round(r, 2) for r in runs["prefetched"]],
            "step_images_per_s": round(ips["bare"], 2), "ratio": round(ips["prefetched"] / ips["bare"], 3),
            "serial_images_per_s": round(ips["serial"], 2), "serial_ratio": round(ips["serial"] / ips["bare"], 3),
            "decode_crop_ms_per_batch": round(statistics.median(crop_ms), 3),
            "step_ms": round(1000 * b / ips["bare"], 3), "steps_per_run": steps}
