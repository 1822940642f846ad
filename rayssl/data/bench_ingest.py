"""Measure ingest alone: decoded + augmented multi-crop samples/s out of the Ray Data pipeline.

Command line::

    python -m rayssl.data.bench_ingest --data URI [--seconds S] [--preset quick|paper]
        [--consumers N] [--batch-size B] [--set data.KEY=VALUE ...] [--s3-endpoint URL]

Builds exactly the training pipeline (``rayssl.data.pipeline.build_train_data``: listing,
fetch, decode, skip/convert accounting, multi-crop) and drains it with ``iter_batches``
from ``--consumers`` threads fed by ``streaming_split`` (as training workers are), for
``--seconds`` after the first batch (epochs repeat as needed). Prints one JSON line:
samples/s, time to the first batch, the CPUs Ray had, the crop recipe and the data counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Sequence

from rayssl.storage import add_s3_flags, s3_data_overrides


def _config(args):
    from rayssl.config import Config, deep_merge, parse_assignment
    from rayssl.presets import resolve_preset

    preset = resolve_preset(args.preset, args.data)
    raw = {k: v for k, v in preset.items() if k in ("run", "data", "model", "optim", "eval")}
    data = {"source": args.data, **s3_data_overrides(args)}
    raw = deep_merge(raw, {"data": data, "run": {"method": "swav", "num_workers": 1,
                                                  "batch_size": args.batch_size}})
    for assignment in args.set:
        raw = deep_merge(raw, parse_assignment(assignment))
    return Config.from_dict(raw)


def bench(cfg, seconds: float, consumers: int = 1, batch_size: int = 32) -> dict:
    """Drain the training pipeline for ``seconds`` (after the first batch); returns the figures."""
    import ray

    from rayssl.data.pipeline import build_train_data, crop_spec

    data = build_train_data(cfg)
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
            state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
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
    spec = crop_spec(cfg)
    counts = ray.get(data.stats.get.remote(), timeout=30)
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
        "cpus": ray.cluster_resources().get("CPU", 0),
        "data_counts": counts,
    }
    if state["error"]:
        out["error"] = state["error"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rayssl.data.bench_ingest",
                                description="Ingest throughput of the rayssl data pipeline (no training).")
    p.add_argument("--data", required=True, help="'scenes', a folder, or an s3:// prefix / shard pattern")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time after the first batch")
    p.add_argument("--preset", choices=["auto", "quick", "paper"], default="quick",
                   help="crop recipe and sizes (default quick: 2x32 + 2x16 crops)")
    p.add_argument("--consumers", type=int, default=1, help="parallel consumers (streaming_split), like workers")
    p.add_argument("--batch-size", type=int, default=32, help="rows per consumer batch")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    add_s3_flags(p)
    args = p.parse_args(argv)

    from rayssl.config import ConfigError
    from rayssl.data.sources import DataError

    try:
        cfg = _config(args)
        if not cfg.data.builtin_scenes:
            from rayssl.data.pipeline import resolve_cfg_source

            resolve_cfg_source(cfg)  # fail before Ray starts
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray

    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1", include_dashboard=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    try:
        result = bench(cfg, args.seconds, args.consumers, args.batch_size)
    finally:
        if started:
            ray.shutdown()
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
