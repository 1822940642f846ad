"""Where a small Ray Train run's fixed cost goes: N tiny runs of ``python -m rayssl.train`` in one
local Ray (2 workers, timm's 0.4 M-parameter test ResNet, 128 scenes, one epoch of 4 steps), each
run's wall time and its summary's ``time``, and where the run's wall time went by Ray Train's
controller log: the controller's start (the command's start to the controller asking for its
workers), the worker group's start and its phases (actors created, train context initialised,
train function launched), the training function (to the workers' shutdown) and the end (to the
command's return). ``--num-workers 0`` runs them in this process (Ray Train's local mode)
instead.

Whatever a Ray started here should inherit (``RAY_*`` settings) is taken from the environment, so
one command compares two settings, e.g. ``RAY_preload_python_modules=torch``.

    python experiments/ray_train_start.py [--runs 4] [--num-workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import tempfile
import time
from datetime import datetime

import ray

from rayssl.bench.gpu_check import TEST_RESNET
from rayssl.cli import train
from rayssl.runtime.cluster import ray_session

TINY = ("--batch-size", "32", "--epochs", "1", "--set", "data.scenes_num_images=128",
        "--set", "eval.num_train_images=100", "--set", "eval.num_test_images=50",
        "--set", "eval.random_baseline=false", "--set", "swav.num_prototypes=32",
        "--set", "swav.projection_hidden_dim=64", "--set", "swav.projection_dim=32",
        *(arg for assignment in TEST_RESNET for arg in ("--set", assignment)))
PHASES = ("worker actors created", "Train context initialized", "Train function launched", "startup completed")
MARKS = {"Requesting resources": "asked", "startup completed": "started", "Shutting down": "shut_down"}


def controller_runs(logs_dir: str) -> list[dict]:
    """Each Ray Train run's controller log: the worker group's start-up phases (seconds, as
    logged) and the times (epoch seconds) of ``MARKS``."""
    runs = []
    for path in glob.glob(os.path.join(logs_dir, "train", "ray-train-sys-controller-*.log")):
        run: dict = {}
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    at = datetime.strptime(entry["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except (ValueError, KeyError):
                    continue
                message = entry.get("message", "")
                for phase in PHASES:
                    if phase in message and phase not in run:
                        seconds = _seconds(message)
                        if seconds is not None:  # a line worded otherwise: the phase is left out
                            run[phase] = seconds
                for mark, key in MARKS.items():
                    if mark in message:
                        run.setdefault(key, at)
        if "asked" in run:
            runs.append(run)
    return runs


def _seconds(message: str) -> float | None:
    """The seconds a phase line gives after its last " in " (``... in 3.21s``), or None."""
    try:
        return float(message.rsplit(" in ", 1)[1].split("s")[0])
    except (IndexError, ValueError):
        return None


def timeline(start: float, end: float, run: dict) -> dict:
    """Seconds of one command: the controller's start, the worker group's start (with its phases),
    the training function, and the end."""
    out = {"controller_start_s": run["asked"] - start}
    if "started" in run:
        out["worker_group_start_s"] = run["started"] - run["asked"]
        out.update({f"{phase}_s": run[phase] for phase in PHASES[:3] if phase in run})
        if "shut_down" in run:
            out["training_function_s"] = run["shut_down"] - run["started"]
            out["end_s"] = end - run["shut_down"]
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=2)
    args = p.parse_args()
    spans = []
    # A local Ray started as the command starts its own, kept for all the runs.
    with ray_session(log_to_driver=False), tempfile.TemporaryDirectory(prefix="rayssl-start-") as tmp:
        logs_dir = ray._private.worker._global_node.get_logs_dir_path()  # this local Ray's own logs
        for i in range(args.runs):
            out = io.StringIO()
            t, start = time.perf_counter(), time.time()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                rc = train.main(["--output", os.path.join(tmp, f"run{i}"), "--num-workers", str(args.num_workers),
                                 *TINY])
            wall = time.perf_counter() - t
            spans.append((start, time.time()))
            summary = json.loads(out.getvalue().strip().splitlines()[-1]) if rc == 0 else {}
            print(json.dumps({"run": i, "rc": rc, "wall_s": round(wall, 1), "time": summary.get("time")}), flush=True)
        if args.num_workers:  # each run's controller: the one that asked for workers while the run's command ran
            runs = controller_runs(logs_dir)
            for i, (start, end) in enumerate(spans):
                run = next((r for r in runs if start <= r["asked"] <= end), None)
                print(json.dumps({"run": i, "timeline": timeline(start, end, run) if run else None}))


if __name__ == "__main__":
    main()
