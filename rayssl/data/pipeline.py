"""The Ray Data pipeline: a source of images -> decoded RGB -> multi-crop uint8 batches.

Rows leaving the pipeline hold only ``crop_0 .. crop_{n-1}`` (uint8, (s, s, 3)): pixels are
shipped compressed-small as uint8 and normalised on the training worker's device.
Decoding happens once per sample, inside the same map task that crops it, so no decoded
full-size image is ever stored in the object store. The pipeline streams: nothing is
materialised, so a long run over a large bucket keeps bounded memory.

Images that cannot be used are dropped and counted in a ``DataStats`` actor; the driver
puts the counts in the run summary and the training loop shows them in its progress.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from rayssl.data.multicrop import MultiCropSpec, multicrop_batch
from rayssl.data.scenes import generate_batch, split_seed

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


class DataError(ValueError):
    """The data source cannot be used (missing, empty, unreadable); names the URI."""


@ray.remote(num_cpus=0)
class DataStats:
    """Counts of images seen, skipped (by reason) and converted, summed over all tasks."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, counts: dict) -> None:
        self.counts.update(counts)

    def get(self) -> dict:
        return dict(self.counts)


def crop_spec(cfg) -> MultiCropSpec:
    d = cfg.data
    return MultiCropSpec(sizes=tuple(d.crop_sizes), counts=tuple(d.crop_counts),
                         min_scale=tuple(d.min_scale), max_scale=tuple(d.max_scale))


def _report(stats, counts: Counter) -> None:
    if stats is not None and counts:
        stats.add.remote(dict(counts))  # fire and forget: never block the data path


def crop_scenes(batch: dict, *, seed: int, size: int, spec: MultiCropSpec, stats=None) -> dict:
    """``{"id": (N,)}`` from ``ray.data.range`` -> generated scenes -> crops."""
    scenes = generate_batch(np.asarray(batch["id"]), seed=seed, size=size)
    rng = np.random.default_rng()  # fresh entropy: every epoch sees new crops
    _report(stats, Counter(seen=len(scenes["image"])))
    return multicrop_batch(list(scenes["image"]), spec, rng)


def decode_and_crop(batch: dict, *, spec: MultiCropSpec, min_side: int, stats=None) -> dict:
    """``{"bytes": (N,)}`` encoded images -> decoded RGB (bad ones dropped, counted) -> crops."""
    from rayssl.data.decode import decode_batch

    images, skipped, converted = decode_batch(list(batch["bytes"]), min_side=min_side)
    good = [im for im in images if im is not None]
    counts = Counter(seen=len(images))
    counts.update({f"skipped.{getattr(k, 'value', k)}": v for k, v in skipped.items()})
    counts.update({f"converted.{k}": v for k, v in converted.items()})
    _report(stats, counts)
    if not good:
        return {f"crop_{j}": np.zeros((0, s, s, 3), np.uint8) for j, s in enumerate(spec.crop_sizes)}
    return multicrop_batch(good, spec, np.random.default_rng())


def list_local_images(path: str | os.PathLike) -> list[str]:
    """All image files below ``path`` (recursive, by extension), sorted; errors name the path."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data source {str(root)!r} does not exist")
    if root.is_file():
        return [str(root)]
    exts = {"." + e for e in IMAGE_EXTENSIONS}
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise DataError(
            f"data source {str(root)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


@dataclass
class TrainData:
    dataset: "ray.data.Dataset"
    num_images: int  # images listed (before any skips): sizes the LR schedule
    stats: object  # DataStats actor handle


def build_train_data(cfg, stats=None) -> TrainData:
    """The training dataset for ``cfg.data.source``: built-in scenes or a local image folder."""
    spec = crop_spec(cfg)
    d = cfg.data
    stats = stats if stats is not None else DataStats.remote()
    if d.builtin_scenes:
        n = d.scenes_num_images
        blocks = max(1, min(64, n // max(1, d.read_batch_size)))
        ds = ray.data.range(n, override_num_blocks=blocks).map_batches(
            crop_scenes,
            batch_size=d.read_batch_size,
            fn_kwargs={"seed": split_seed(cfg.run.seed, "train"), "size": d.scenes_image_size,
                       "spec": spec, "stats": stats},
        )
        return TrainData(ds, n, stats)
    files = list_local_images(d.source)
    ds = ray.data.read_binary_files(files, include_paths=False).map_batches(
        decode_and_crop,
        batch_size=d.read_batch_size,
        fn_kwargs={"spec": spec, "min_side": 1, "stats": stats},
    )
    return TrainData(ds, len(files), stats)
