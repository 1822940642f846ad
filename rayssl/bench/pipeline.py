"""The data pipeline alone and feeding the step: images/s out of Ray Data, and into ``train_step``.

``measure_pipeline``: the step (``rayssl.bench.step``) fed by the real Ray Data pipeline
(``rayssl.data.pipeline.build_train_data`` read through ``rayssl.data.feed.TrainFeed``, as a
training worker reads its shard) from local WebDataset shards of JPEGs that the bench writes
itself (or ``--data``, e.g. an ``s3://`` prefix), with ``data.augment_on`` cpu (Ray Data crops)
or device (the worker decodes and crops). ``measure_ingest``: decoded + augmented samples/s out
of the same pipeline with no training, drained by ``consumers`` threads fed by
``streaming_split`` (as training workers are), for ``seconds`` after the first batch. Both need
a connected Ray.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from rayssl.bench.step import StepBench, error_line, timed
from rayssl.config import Config
from rayssl.data.feed import TrainFeed
from rayssl.data.multicrop import crop_spec
from rayssl.data.pipeline import build_train_data
from rayssl.data.shards import write_shards
from rayssl.data.sources import Source
from rayssl.runtime.cluster import capacity

__all__ = ["measure_ingest", "measure_pipeline", "write_jpeg_shards"]


def write_jpeg_shards(out_dir: str, num_images: int, scene_size: int, seed: int = 0) -> str:
    """Local WebDataset shards of JPEG scenes (``rayssl.data.shards``, in parallel on Ray)."""
    write_shards("scenes", out_dir, "webdataset", shard_size=max(16, num_images // 8), num_scenes=num_images,
                 scene_size=scene_size, seed=seed, image_format="jpg")
    return out_dir


def _epochs(feed: TrainFeed, stats, source: str):
    """Crop batches from ``feed``, epoch after epoch, each epoch announced first (it seeds the crops)."""
    epoch = 0
    while True:
        stats.set_epoch(epoch)
        got = 0
        for crops, columns in feed.epoch(epoch):
            got += 1
            yield crops, columns
        if got == 0:
            raise RuntimeError(f"the pipeline produced no batch of {feed.batch_size} images from {source}")
        epoch += 1


def measure_pipeline(cfg: Config, device: torch.device, steps: int, warmup: int, repeats: int,
                     step_ips: float | None, ingest_seconds: float, source: Source | None = None) -> dict:
    """The step fed by the pipeline (one consumer = one worker); median over repeats. ``source``:
    the listing of ``cfg.data.source`` where the caller has it (a bucket's listing can take minutes)."""
    sb = StepBench(cfg, device)
    data = build_train_data(cfg.data, cfg.run.seed, source=source)
    feed = TrainFeed(data.dataset, cfg.data, device, batch_size=cfg.run.batch_size, seed=cfg.run.seed,
                     columns=sb.method.batch_columns, channels_last=sb.engine.channels_last)
    batches = _epochs(feed, data.stats, cfg.data.source)
    t_first = time.perf_counter()
    for _ in range(max(1, warmup)):
        sb.step(*next(batches))
    first = time.perf_counter() - t_first
    runs = []
    for _ in range(repeats):
        def run():
            for _ in range(steps):
                sb.step(*next(batches))
        runs.append(cfg.run.batch_size * steps / timed(run, device))
    batches.close()
    feed.close()  # its pipeline stops before the ingest is measured alone
    ips = statistics.median(runs)
    out = {"images_per_s": round(ips, 2), "runs_images_per_s": [round(r, 2) for r in runs],
           "ratio": round(ips / step_ips, 3) if step_ips else None,
           "augment_on": cfg.data.augment_on, "data": cfg.data.source, "images_listed": data.num_images,
           "warmup_s": round(first, 2), "data_counts": data.stats.get(timeout=30)}
    if ingest_seconds > 0:
        ing = measure_ingest(cfg, ingest_seconds, consumers=1, batch_size=cfg.run.batch_size, source=data.source)
        out["ingest_alone_images_per_s"] = ing["samples_per_s"]
        out["ingest_alone_epochs"] = ing["epochs_completed"]  # each epoch's start is in the figure
        if "error" in ing:
            out["ingest_error"] = ing["error"]
    return out


def measure_ingest(cfg: Config, seconds: float, consumers: int = 1, batch_size: int = 32,
                   source: Source | None = None) -> dict:
    """Drain the training pipeline for ``seconds`` (after the first batch); returns the figures.
    ``source`` as for ``measure_pipeline``."""
    data = build_train_data(cfg.data, cfg.run.seed, source=source)
    lock = threading.Lock()
    state = {"samples": 0, "first": None, "epochs": 0, "error": None}
    t_start = time.perf_counter()
    stop = threading.Event()

    def drain(it) -> None:
        try:
            while not stop.is_set():
                got = 0
                for batch in it.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
                    n = len(next(iter(batch.values())))  # crops, or shipped bytes (augment_on=device)
                    got += n
                    with lock:
                        if state["first"] is None:  # the first batch pays the start-up: not timed
                            state["first"] = time.perf_counter()
                        else:
                            state["samples"] += n
                    if stop.is_set():
                        return
                with lock:
                    state["epochs"] += 1
                if got == 0:
                    return  # nothing usable at all
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            state["error"] = error_line(exc)
            stop.set()

    if consumers > 1:
        iterators = data.dataset.streaming_split(consumers, equal=False)
    else:
        iterators = [data.dataset]
    threads = [threading.Thread(target=drain, args=(it,), daemon=True) for it in iterators]
    for t in threads:
        t.start()
    while not stop.is_set():
        time.sleep(0.2)
        with lock:
            first = state["first"]
        if first is not None and time.perf_counter() - first >= seconds:
            stop.set()
        if not any(t.is_alive() for t in threads):
            break
    end = time.perf_counter()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    first = state["first"] or end
    measured = max(1e-9, end - first)
    spec = crop_spec(cfg.data)
    counts = data.stats.get(timeout=30)
    out = {
        "data": cfg.data.source,
        "kind": data.source.kind if data.source is not None else "scenes",
        "images_listed": data.num_images,
        "samples": state["samples"],
        "seconds": round(measured, 2),
        "samples_per_s": round(state["samples"] / measured, 1),
        "time_to_first_batch_s": round(first - t_start, 2),
        "epochs_completed": state["epochs"] // max(1, consumers),  # full passes over the data
        "consumers": consumers,
        "batch_size": batch_size,
        "crops": [f"{c}x{s}" for s, c in zip(spec.sizes, spec.counts)],
        "cpus": capacity()[0].get("CPU", 0),
        "data_counts": counts,
    }
    if state["error"]:
        out["error"] = state["error"]
    return out
