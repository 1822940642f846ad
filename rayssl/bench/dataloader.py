"""The baseline a user would otherwise write: the same step fed by a ``torch.utils.data.DataLoader``.

``measure_dataloader`` reads the same files as the pipeline measurement (tar shards or image
files, local or ``s3://``) with the very functions Ray Data's tasks run on them
(``tar_shards_to_crops`` / ``fetch_decode_and_crop``: the same decoding, bad-image checks and
per-sample seeded multi-crop), in ``num_workers`` DataLoader processes (cores - 1, as a user
would pick; spawned, since this process may hold Ray), with pinned memory on CUDA. The main
process cuts the workers' chunks into batches of the run's batch size and runs the step
(``StepBench.step``, the engine's ``train_step``). Epoch after epoch, so a measurement longer
than the data wraps around as the pipeline's does. No shuffle buffer (the pipeline has one).

``measure_dataloader_ingest`` drains the same DataLoader without a step: the decoded and cropped
images/s it hands over, beside Ray Data's ingest alone (``rayssl.bench.pipeline.measure_ingest``).
With no step to share the cores, it takes one worker per core, as Ray Data's tasks take every CPU.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rayssl.bench.quality import cut_batches
from rayssl.bench.step import StepBench, error_line, timed
from rayssl.config import Config
from rayssl.data.multicrop import crop_spec
from rayssl.data.pipeline import fetch_decode_and_crop, min_image_side, resolve_data_source, tar_shards_to_crops
from rayssl.data.sources import Source
from rayssl.data.tensors import to_float_images

__all__ = ["measure_dataloader", "measure_dataloader_ingest", "reads"]


class _Crops(IterableDataset):
    """Crop chunks (dicts of uint8 arrays, ``crop_j`` keys) from this worker's share of the files."""

    def __init__(self, source, spec, min_side: int, seed: int, chunk: int):
        self.source, self.spec, self.min_side, self.seed, self.chunk = source, spec, min_side, seed, chunk

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        paths = self.source.paths[worker::workers]
        common = {"fs": self.source.fs, "spec": self.spec, "min_side": self.min_side, "seed": self.seed}
        if self.source.kind == "webdataset":
            yield from tar_shards_to_crops({"path": paths}, chunk=self.chunk, **common)
            return
        for i in range(0, len(paths), self.chunk):
            out = fetch_decode_and_crop({"path": paths[i:i + self.chunk]}, **common)
            if out:
                yield out


def _epochs(loader: DataLoader, finished: list | None = None):
    """The loader's chunks, epoch after epoch (a batch may span two); an epoch without any stops it.
    Each epoch read to its end is appended to ``finished`` (if given)."""
    while True:
        got = 0
        for chunk in loader:
            got += 1
            yield chunk
        if not got:
            raise RuntimeError("the DataLoader produced no images")
        if finished is not None:
            finished.append(got)


def _batches(loader: DataLoader, batch_size: int, keys: list[str]):
    """Exact batches of ``batch_size`` cut from the loader's chunks, epoch after epoch."""
    return cut_batches(_epochs(loader), batch_size, keys)


def reads(source: Source) -> str | None:
    """Why the baseline cannot read ``source`` (a resolved data source; None: it can)."""
    if source.kind in ("webdataset", "images"):
        return None
    return f"the DataLoader baseline reads tar shards or image files, not {source.kind}"


def _loader(cfg: Config, source: Source, pin_memory: bool, num_workers: int) -> DataLoader:
    """A DataLoader of crop chunks (up to a batch each) of ``source``, as Ray Data's tasks crop them."""
    dataset = _Crops(source, crop_spec(cfg.data), min_image_side(cfg.data), cfg.run.seed, chunk=cfg.run.batch_size)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                      multiprocessing_context="spawn" if num_workers > 0 else None)


def measure_dataloader(cfg: Config, device: torch.device, steps: int, warmup: int, repeats: int,
                       num_workers: int | None = None, source: Source | None = None) -> dict:
    """Images/s of the step fed by a DataLoader over ``cfg.data.source`` (``source``: its listing,
    where the caller has it: a bucket's listing can take minutes); median over repeats."""
    source = source or resolve_data_source(cfg.data)
    why = reads(source)
    if why:
        return {"skipped": why}
    workers = num_workers if num_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    sb = StepBench(cfg, device)
    keys = [f"crop_{j}" for j in range(sum(cfg.data.crop_counts))]
    loader = _loader(cfg, source, device.type == "cuda", workers)
    batches = _batches(loader, cfg.run.batch_size, keys)

    def step():
        crops = [to_float_images(c.to(device, non_blocking=True), channels_last=sb.engine.channels_last)
                 for c in next(batches)]
        sb.step(crops, {})

    t_first = time.perf_counter()
    for _ in range(max(1, warmup)):
        step()
    first = time.perf_counter() - t_first
    runs = []
    for _ in range(repeats):
        def run():
            for _ in range(steps):
                step()
        runs.append(cfg.run.batch_size * steps / timed(run, device))
    batches.close()
    del loader
    ips = statistics.median(runs)
    return {"images_per_s": round(ips, 2), "runs_images_per_s": [round(r, 2) for r in runs],
            "num_workers": workers, "pin_memory": device.type == "cuda", "warmup_s": round(first, 2)}


def measure_dataloader_ingest(cfg: Config, seconds: float, num_workers: int | None = None,
                              source: Source | None = None) -> dict:
    """Decoded + cropped images/s the DataLoader hands over, no step: chunks drained for
    ``seconds`` after the first (which pays the workers' start and is not counted). ``source``
    as for ``measure_dataloader``."""
    source = source or resolve_data_source(cfg.data)
    why = reads(source)
    if why:
        return {"skipped": why}
    workers = num_workers if num_workers is not None else max(1, os.cpu_count() or 1)
    loader = _loader(cfg, source, False, workers)
    finished: list[int] = []
    chunks = _epochs(loader, finished)
    try:
        t_start = time.perf_counter()
        next(chunks)
        first = time.perf_counter()
        images = 0
        while time.perf_counter() - first < seconds:
            images += len(next(chunks)["crop_0"])
        measured = time.perf_counter() - first
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, as the pipeline's ingest reports its own
        return {"error": error_line(exc), "num_workers": workers}
    finally:
        chunks.close()
        del loader
    return {"samples_per_s": round(images / measured, 1), "samples": images, "seconds": round(measured, 2),
            "time_to_first_batch_s": round(first - t_start, 2), "epochs_completed": len(finished),
            "num_workers": workers}
