"""SwAV's learning curve on the built-in scenes, over several seeds, in one process.

    python experiments/swav_trials.py [--seeds 0 1 2] [--eval-every 64] [--threads 1]
        [--device cpu|cuda] [--eval-train 2000] [--eval-test 1000] [--set section.key=value ...]

The default run's recipe (the quick preset on the built-in scenes, every ``--set`` a
``python -m rayssl.train --set`` would take) trained by the package's own pieces -- the
scenes generator, ``multicrop_batch`` with the pipeline's per-image seeds, and the training
engine with its one step (``rayssl.engine.Engine.train_step``, what the Ray worker runs) -- in
a single process at the run's global batch, with no Ray. Every ``--eval-every`` steps it scores the backbone's kNN top-1
on held-out scenes next to *its own* random initialisation (the same torch seed), so each
seed gives a paired difference; the summary gives their mean and standard error over seeds.

Feeds docs/results/swav-on-scenes.md. This is the harness behind its rounds of SwAV trials, kept so that a
recipe can be tested over seeds at a longer budget on a GPU (``--device cuda``
``--set run.epochs=...``) without rebuilding it. One run is not evidence: the random-init
score alone varies by about 0.016 between seeds at 1,000 / 500 held-out scenes.
Progress on stderr; last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import numpy as np
import torch

from rayssl.config import Config, deep_merge, parse_assignment
from rayssl.data.multicrop import crop_spec, multicrop_batch, sample_generators
from rayssl.data.scenes import generate_batch, split_seed
from rayssl.data.tensors import to_float_images
from rayssl.engine import Engine
from rayssl.eval.features import evaluate_on_scenes, scenes_eval_sets
from rayssl.presets import layered_config


def build_config(assignments: list[str], seed: int) -> Config:
    """The Config ``python -m rayssl.train --seed SEED --set ...`` would run, on one worker."""
    overrides = {"run": {"method": "swav", "seed": seed, "num_workers": 1}}
    for text in assignments:
        overrides = deep_merge(overrides, parse_assignment(text))
    return layered_config(overrides)


def run_seed(cfg: Config, eval_every: int, n_train: int, n_test: int, device: str) -> dict:
    """Train one seed; the kNN curve of the trained backbone and of its own random init."""
    seed, d = cfg.run.seed, cfg.data
    spec = crop_spec(d)
    per_epoch = d.scenes_num_images // cfg.run.batch_size
    engine = Engine(cfg, per_epoch, device)  # the SwAV module from cfg.run.seed, its optimiser and schedule
    engine.start()
    model = engine.method
    random_init = copy.deepcopy(model.backbone).eval()
    steps = cfg.run.epochs * per_epoch

    size = d.scenes_image_size
    scenes = generate_batch(range(d.scenes_num_images), seed=split_seed(seed, "train"), size=size)["image"]
    sets = scenes_eval_sets(seed, size, n_train, n_test)
    base = evaluate_on_scenes("knn_top1", random_init, sets, size, device)
    curve, losses, t0 = [], [], time.perf_counter()
    order_rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            order = order_rng.permutation(d.scenes_num_images)
        idx = order[i * cfg.run.batch_size:(i + 1) * cfg.run.batch_size]
        batch = multicrop_batch([scenes[j] for j in idx], spec, sample_generators(seed, epoch, idx.tolist()))
        crops = [to_float_images(torch.from_numpy(batch[f"crop_{c}"]).to(device),
                                 channels_last=engine.channels_last) for c in range(spec.num_crops)]
        evaluate = (step + 1) % eval_every == 0 or step + 1 == steps
        engine.epoch = epoch
        # The loss is checked every step on CPU, on a GPU only when the host reads it anyway
        # (here: at evaluations), so a step costs no extra device sync.
        losses.append(engine.train_step(crops, check_loss=device == "cpu" or evaluate)["loss"])
        if evaluate:
            knn = evaluate_on_scenes("knn_top1", model.backbone, sets, size, device)
            model.train()
            curve.append({"step": step + 1, "loss": round(torch.stack(losses[-eval_every:]).mean().item(), 4),
                          "knn_top1": round(knn, 4)})
            print(f"seed {seed} step {step + 1}/{steps}: loss {curve[-1]['loss']:.4f} kNN {knn:.3f} "
                  f"(random init {base:.3f}; {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return {"seed": seed, "random_init": round(base, 4), "curve": curve}


def summarise(runs: list[dict]) -> list[dict]:
    """Per evaluation step: mean trained - random-init difference over seeds and its standard error."""
    out = []
    for pos, point in enumerate(runs[0]["curve"]):
        diffs = np.array([r["curve"][pos]["knn_top1"] - r["random_init"] for r in runs])
        se = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
        out.append({"step": point["step"], "mean_gain": round(float(diffs.mean()), 4),
                    "se": round(se, 4), "seeds_above": int((diffs > 0).sum()), "seeds": len(diffs)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=64, help="steps between kNN evaluations")
    p.add_argument("--eval-train", type=int, default=2000, help="labelled scenes the kNN searches")
    p.add_argument("--eval-test", type=int, default=1000, help="scenes it classifies")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting, as python -m rayssl.train --set does (repeatable)")
    a = p.parse_args(argv)
    if a.eval_every < 1:
        p.error("--eval-every must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    runs = [run_seed(build_config(a.assignments, s), a.eval_every, a.eval_train, a.eval_test, a.device)
            for s in a.seeds]
    print(json.dumps({"settings": a.assignments, "runs": runs, "summary": summarise(runs),
                      "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
