"""CDUL on generated scenes with the tiny CLIP: pseudo-label quality and classifier mAP.

Feeds docs/results/cdul-on-scenes.md.

    python experiments/cdul_scenes.py --work DIR [--clip-steps 400] [--num-scenes 1024] [--epochs 6]

1. trains the tiny CLIP (``rayssl.pseudolabel.tiny_clip``) unless DIR/tiny_clip.pt exists;
2. runs ``python -m rayssl.pseudolabel`` on the training scenes (2 actors): mAP of the
   global-only, aggregated-only and combined pseudo-labels against the scenes' ground truth;
3. trains the CDUL classifier (2 workers) on those initial labels with and without gradient
   alignment and reports its mAP on held-out scenes.

Prints one JSON object (last line of stdout) and writes DIR/cdul_scenes.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path


def _run(main, argv) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"{argv[:2]} failed with {rc}")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--clip-steps", type=int, default=400)
    p.add_argument("--num-scenes", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clip = work / "tiny_clip.pt"
    report: dict = {}
    if not clip.exists():
        from rayssl.pseudolabel.tiny_clip import train_tiny_clip

        report["tiny_clip"] = train_tiny_clip(str(clip), steps=args.clip_steps, seconds=3600, num_scenes=2048,
                                              log=lambda m: print(m, file=sys.stderr, flush=True))
    from rayssl.cli.label import main as label_main
    from rayssl.cli.train import main as train_main
    from rayssl.runtime.cluster import ray_session

    with ray_session(log_to_driver=False):
        labels = work / "labels"
        if not (labels / "summary.json").exists():
            report["pseudolabels"] = _run(label_main, [
                "--data", "scenes", "--num-scenes", str(args.num_scenes), "--scenes-size", "64",
                "--clip-model", "rayssl-tiny-clip", "--clip-pretrained", str(clip), "--out", str(labels),
                "--num-actors", "2", "--batch-size", "32"])
        else:
            report["pseudolabels"] = json.loads((labels / "summary.json").read_text())
        s = args.image_size
        for name, ga in (("without_alignment", "false"), ("with_alignment", "true")):
            out = work / f"train-{name}"
            if (out / "summary.json").exists():
                report[name] = json.loads((out / "summary.json").read_text())
                continue
            report[name] = _run(train_main, [
                "--method", "cdul", "--data", "scenes", "--pseudo-labels", str(labels), "--output", str(out),
                "--preset", "quick", "--num-workers", "2", "--batch-size", str(args.batch_size),
                "--epochs", str(args.epochs), "--set", f"data.scenes_num_images={args.num_scenes}",
                "--set", f"data.crop_sizes=[{s}]", "--set", "data.crop_counts=[2]",
                "--set", "data.min_scale=[0.6]", "--set", "data.max_scale=[1.0]",
                "--set", "model.small_stem=true", "--set", "optim.base_lr=0.4",
                "--set", "eval.num_train_images=100", "--set", "eval.num_test_images=500", "--set", "eval.knn_k=5",
                "--set", f"cdul.gradient_alignment={ga}", "--set", "cdul.label_warmup_epochs=2",
                "--set", "cdul.label_update_every=1"])
    pl = report["pseudolabels"]
    short = {"map_global": pl.get("map_global"), "map_aggregated": pl.get("map_aggregated"),
             "map_final": pl.get("map_final"),
             "classifier_map_without_alignment": report["without_alignment"]["classifier_map"],
             "classifier_map_with_alignment": report["with_alignment"]["classifier_map"]}
    report["result"] = short
    (work / "cdul_scenes.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
