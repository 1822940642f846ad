"""What a run's evaluation on the user's labelled images (``--eval-data``) costs.

Writes N labelled scenes as an ImageFolder of JPEGs (``rayssl scenes``' writer), then times the
evaluation a training run makes at an evaluated epoch (``rayssl.runtime.evaluation.
UserDataEvaluation``, as rank 0 runs it, with the node's cores), on a freshly built engine of the
default recipe: the first call (the trained weights and, once per run, the random init) and a
second (the trained weights alone). No Ray session is needed: the images are read in-process.
Prints one JSON line.

    python experiments/eval_cost.py [--images 10000] [--size 64] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from rayssl.data.scenes import write_image_folder
from rayssl.engine import Engine
from rayssl.presets import layered_config
from rayssl.runtime.evaluation import UserDataEvaluation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--size", type=int, default=64, help="side of the scenes written (px)")
    p.add_argument("--dir", default="", help="an existing ImageFolder to use instead of writing one")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayssl-evalcost-") as tmp:
        folder = args.dir
        t = time.perf_counter()
        if not folder:
            folder = str(write_image_folder(os.path.join(tmp, "val"), args.images, seed=1, size=args.size, fmt="jpg",
                                            layout="imagefolder", split="eval-train"))
        write_s = time.perf_counter() - t
        cfg = layered_config({"data": {"source": os.path.join(tmp, "unused")},
                              "eval": {"data": folder, "protocol": "knn"}}, preset="quick")
        engine = Engine(cfg, steps_per_epoch=1, device=torch.device("cpu"))
        evaluate = UserDataEvaluation(engine)
        t = time.perf_counter()
        first = evaluate(0)
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        evaluate(1)
        again_s = time.perf_counter() - t
    print(json.dumps({"images": first["eval_images"], "image_size": args.size, "crop": cfg.data.crop_sizes[0],
                      "backbone": cfg.model.backbone, "cpus": os.cpu_count(), "write_s": round(write_s, 1),
                      "first_evaluation_s": round(first_s, 1), "evaluation_s": round(again_s, 1),
                      "knn_top1": first["knn_top1"], "knn_top1_random_init": first.get("knn_top1_random_init")}))


if __name__ == "__main__":
    main()
