"""What evaluating on the user's labelled images every epoch costs the training, three ways.

Writes N unlabelled scene JPEGs (the training data) and M labelled ones as an ImageFolder (the
evaluation data), then runs ``python -m rayssl.train --data TRAIN --preset quick`` three times
with the same settings: without an evaluation (``off``), with ``--eval-data VAL --set
eval.every_epochs=1`` evaluated on rank 0 between epochs (``rank0``: ``eval.where=rank0``, what
``auto`` picks on CPUs), and the same in a Ray task beside training (``beside``). Prints one JSON line per run (the summary's training
images/s, which counts steps and data waits of the last epoch; the time block's evaluation
seconds, what rank 0 spent evaluating or waiting for an evaluation; the wall time; the final
score) and, last, each mode's images/s and wall time against ``off``.

    python experiments/eval_beside_training.py [--images 1024] [--eval-images 2000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from rayssl.data.scenes import write_image_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024, help="unlabelled training scenes")
    p.add_argument("--eval-images", type=int, default=2000, help="labelled evaluation scenes")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="side of the scenes written (px)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayssl-evalbeside-") as tmp:
        train = write_image_folder(os.path.join(tmp, "train"), args.images, seed=2, size=args.size, fmt="jpg",
                                   split="train")
        val = write_image_folder(os.path.join(tmp, "val"), args.eval_images, seed=1, size=args.size, fmt="jpg",
                                 layout="imagefolder", split="eval-train")
        modes = {"off": [], "rank0": ["--eval-data", str(val), "--set", "eval.where=rank0"],
                 "beside": ["--eval-data", str(val), "--set", "eval.where=beside"]}
        results = {}
        for mode, extra in modes.items():
            cmd = [sys.executable, "-m", "rayssl.train", "--data", str(train), "--preset", "quick",
                   "--output", os.path.join(tmp, mode),
                   "--epochs", str(args.epochs), "--set", "eval.every_epochs=1", "--set", "eval.random_baseline=false",
                   *extra]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{mode}: rayssl.train failed ({proc.returncode})")
            s = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode] = {"mode": mode, "images_per_s": s["images_per_s"], "eval_s": s["time"].get("eval_s"),
                             "outside_steps_pct": s["time"].get("outside_steps_pct"), "wall_s": round(wall, 1),
                             "metric": s["metric"], "score": s.get(s["metric"]) if s["metric"] else None}
            print(json.dumps(results[mode]), flush=True)
    off = results["off"]
    print(json.dumps({m: {"images_per_s_over_off": round(r["images_per_s"] / off["images_per_s"], 3),
                          "wall_over_off": round(r["wall_s"] / off["wall_s"], 3)}
                      for m, r in results.items() if m != "off"}))


if __name__ == "__main__":
    main()
