"""``python -m rayssl.viz``: draw a run's pictures as PNG files.

    python -m rayssl.viz curves        --run RUN_DIR --out curves.png
    python -m rayssl.viz prototypes    --checkpoint RUN_OR_CKPT [--data scenes|PATH] --out protos.png
    python -m rayssl.viz mls-positives --checkpoint RUN_OR_CKPT [--data scenes|PATH] --out positives.png

``curves`` redraws ``<run>/metrics.jsonl`` (training writes ``<run>/curves.png`` itself after every
epoch). ``prototypes`` (SwAV): how many images each prototype wins, most used first; a collapse is
one tall bar. ``mls-positives`` (MLS/MoCo): query images and the k queue images their backbone
feature picks as positive labels. Images come from held-out built-in scenes (never the training
stream) or from a folder / s3:// prefix of image files. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from rayssl.checkpoint import CheckpointError
from rayssl.data.sources import DataError
from rayssl.outfile import OutputError, check_writable
from rayssl.storage import S3Options, configure_s3


def sample_images(data: str, n: int, size: int, scene_size: int, seed: int,
                  options: S3Options) -> tuple[np.ndarray, list[set] | None]:
    """``n`` images (uint8 (n, size, size, 3)) and, for the scenes, their class-name sets."""
    from rayssl.eval.preprocess import center_square

    if data == "scenes":
        from rayssl.data.scenes import SHAPES, generate_batch, split_seed

        b = generate_batch(range(n), seed=split_seed(seed, "eval-test"), size=scene_size)
        images = b["image"] if scene_size == size else np.stack([center_square(im, size) for im in b["image"]])
        return images, [{SHAPES[c] for c in np.flatnonzero(row)} for row in b["labels"]]
    from rayssl.data.decode import decode_image
    from rayssl.data.sources import resolve_source

    source = resolve_source(data, options)
    if source.kind != "images":
        raise DataError(f"--data {data}: pictures read image files; got {source.kind} shards")
    order = np.random.default_rng(seed).permutation(len(source.paths))
    out = []
    for i in order:
        img, _, _ = decode_image(source.fs.cat_file(source.paths[i]))
        if img is not None:
            out.append(center_square(img, size))
        if len(out) == n:
            break
    if len(out) < n:
        raise DataError(f"--data {data}: only {len(out)} readable images, {n} needed")
    return np.stack(out), None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayssl.viz", description="Draw a rayssl run's pictures (PNG).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="training curves from <run>/metrics.jsonl")
    c.add_argument("--run", required=True, help="run directory (--output of rayssl.train)")
    for name, helptext in (("prototypes", "SwAV prototype-usage histogram"),
                           ("mls-positives", "MLS queries and their top-k queue positives")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--checkpoint", required=True, help="checkpoint or run directory (local or s3://)")
        s.add_argument("--data", default="scenes", help="'scenes' (held-out built-in scenes) or a folder/prefix of images")
        s.add_argument("--seed", type=int, default=0, help="which images (default 0)")
        s.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's large-crop size")
        if name == "prototypes":
            s.add_argument("--num-images", type=int, default=1024, help="images assigned (default 1024)")
        else:
            s.add_argument("--queries", type=int, default=6, help="query rows (default 6)")
            s.add_argument("--gallery", type=int, default=512, help="images filling the queue (default 512)")
            s.add_argument("--k", type=int, default=None, help="positives shown (default: min(mls.k, 8))")
    for s in sub.choices.values():
        s.add_argument("--out", required=True, help="PNG file to write (local or s3://)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        s.add_argument("--s3-endpoint", default=None, metavar="URL", help="S3-compatible endpoint")
    return p


def run(args, options: S3Options) -> dict:
    from rayssl.viz import figures

    if args.command == "curves":
        from rayssl.viz.tracking import read_history

        history = read_history(args.run)
        if not history:
            raise DataError(f"--run {args.run}: no metrics.jsonl (not a rayssl run, or no epoch finished yet)")
        metric = None
        try:
            import yaml

            from rayssl.methods import get_method
            from rayssl.storage import read_text

            cfg = yaml.safe_load(read_text(f"{args.run.rstrip('/')}/config.yaml"))
            metric = get_method(cfg["run"]["method"]).metric
        except Exception:  # noqa: BLE001 - the curves still draw without the metric panel
            pass
        series = figures.plot_training_curves(history, args.out, metric, title=args.run)
        return {"picture": "curves", "out": args.out, "epochs": len(history),
                "panels": [k for k, v in series.items() if v]}

    from rayssl.eval.loading import load_checkpoint
    from rayssl.viz.models import load_method, mls_positives, swav_assignments

    ckpt = load_checkpoint(args.checkpoint, options)
    size = args.image_size or ckpt.image_size
    scene_size = ckpt.config["data"]["scenes_image_size"]
    model = load_method(ckpt)
    title = f"{ckpt.method} {ckpt.backbone_name}, epoch {ckpt.epoch}"
    if args.command == "prototypes":
        if not hasattr(model, "prototypes"):
            raise ValueError(f"--checkpoint {ckpt.uri}: prototype usage needs a SwAV checkpoint, got {ckpt.method}")
        images, _ = sample_images(args.data, args.num_images, size, scene_size, args.seed, options)
        counts = figures.prototype_usage(swav_assignments(model, images), model.cfg.num_prototypes)
        stats = figures.plot_prototype_usage(counts, args.out, title=title)
        return {"picture": "prototypes", "out": args.out, "images": len(images), **stats}
    if not hasattr(model, "momentum_backbone"):
        raise ValueError(f"--checkpoint {ckpt.uri}: queue positives need an MLS/MoCo checkpoint, got {ckpt.method}")
    k = args.k or min(model.cfg.k, 8)
    images, labels = sample_images(args.data, args.queries + args.gallery, size, scene_size, args.seed, options)
    idx, sims = mls_positives(model, images[:args.queries], images[args.queries:], k)
    stats = figures.plot_positives_grid(images[:args.queries], images[args.queries:], idx, sims, args.out,
                                        labels[:args.queries] if labels else None,
                                        labels[args.queries:] if labels else None, title=title)
    return {"picture": "mls-positives", "out": args.out, **stats}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = S3Options(endpoint=args.s3_endpoint or "")
    configure_s3(options)
    try:
        check_writable(args.out, "--out", overwrite=args.overwrite, options=options)
        summary = run(args, options)
    except (CheckpointError, DataError, OutputError, ValueError) as exc:
        print(f"python -m rayssl.viz: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
