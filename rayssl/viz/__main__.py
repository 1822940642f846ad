"""``python -m rayssl.viz``: draw a run's pictures as PNG files.

    python -m rayssl.viz curves        --run RUN_DIR --out curves.png
    python -m rayssl.viz prototypes    --checkpoint RUN_OR_CKPT [--data scenes|PATH] --out protos.png
    python -m rayssl.viz mls-positives --checkpoint RUN_OR_CKPT [--data scenes|PATH] --out positives.png
    python -m rayssl.viz cdul-labels   --checkpoint RUN_OR_CKPT [--pseudo-labels URI] --out labels.png

``curves`` redraws ``<run>/metrics.jsonl`` (training writes ``<run>/curves.png`` itself after every
epoch). ``prototypes`` (SwAV): how many images each prototype wins, most used first; a collapse is
one tall bar. ``mls-positives`` (MLS/MoCo): query images and the k queue images their backbone
feature picks as positive labels. Images come from held-out built-in scenes (never the training
stream) or from a folder / s3:// prefix of image files. ``cdul-labels`` (CDUL): training images
with their top pseudo-labels before gradient alignment (the CLIP labels of ``python -m
rayssl.pseudolabel``, whose output the run records as ``cdul.pseudo_labels``) and after it (the
label store saved in the checkpoint); the images are read from where the label table says they
are (built-in scenes are regenerated, with their true classes). The last stdout line is a JSON
summary.
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
from rayssl.storage import S3Options, add_s3_flags, configure_s3


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


FILE_TILE = 128  # side (pixels) of image files drawn by cdul-labels; scenes keep their own size


def read_initial_labels(uri: str, recorded: bool, options: S3Options) -> tuple[dict, dict]:
    """The labelling job's table (meta, columns index/id/path/soft_label); DataError (one line)
    when it cannot be read. ``recorded``: ``uri`` comes from the checkpoint's config."""
    from rayssl.pseudolabel.store import read_pseudo_labels

    flag = "cdul.pseudo_labels (recorded by the run)" if recorded else "--pseudo-labels"
    hint = "; pass --pseudo-labels URI if the labels moved" if recorded else ""
    try:
        meta, cols = read_pseudo_labels(uri, columns=("index", "id", "path", "soft_label"), options=options)
        classes = [str(c) for c in meta["classes"]]
        num_rows = int(meta["num_rows"])
        source = dict(meta["source"])
    except FileNotFoundError as exc:
        raise DataError(str(exc).splitlines()[0].replace("--pseudo-labels:", f"{flag}:", 1) + hint) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(f"{flag}: {uri} is not a readable `python -m rayssl.pseudolabel` output "
                        f"({type(exc).__name__}: {first}){hint}") from None
    return {"classes": classes, "num_rows": num_rows, "source": source}, cols


def choose_rows(before: np.ndarray, after: np.ndarray, index: np.ndarray, select: str, seed: int) -> np.ndarray:
    """Order in which candidate rows are drawn: ``changed`` = largest sum over classes of
    |after - before| first (ties: lower image index); ``random`` = a permutation from ``seed`` of
    the candidates sorted by image index (so the draw does not depend on the table's row order)."""
    if select == "changed":
        change = np.abs(after.astype(np.float64) - before.astype(np.float64)).sum(1)
        return np.lexsort((index, -change))
    return np.random.default_rng(seed).permutation(len(index))


def cdul_images(source: dict, index: np.ndarray, ids: np.ndarray, paths: np.ndarray, n: int, classes: list[str],
                options: S3Options) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """The first ``n`` readable images among the candidate rows (in order), read from where the
    label table says they are. Returns (rows used, uint8 (n, H, W, 3), truth (n, C) or None)."""
    kind = source.get("kind")
    if kind == "scenes":
        from rayssl.data.scenes import SHAPES, generate_batch

        rows = list(range(min(n, len(index))))
        b = generate_batch(index[rows], seed=int(source["seed"]), size=int(source["size"]))
        for r, key in zip(rows, b["key"]):
            if str(ids[r]) != str(key):
                raise DataError(f"--pseudo-labels: row {index[r]} is {ids[r]!r}, but scene {index[r]} of stream "
                                f"{source['seed']} is {key!r}; the table does not match its pseudolabels.json")
        cols = [SHAPES.index(c) if c in SHAPES else -1 for c in classes]
        truth = np.stack([[row[j] if j >= 0 else 0 for j in cols] for row in b["labels"]]).astype(np.uint8)
        return rows, b["image"], truth
    if kind != "images":
        raise DataError(f"--pseudo-labels: labels of {kind!r} data; cdul-labels draws scenes or image files")
    from rayssl.data.decode import decode_image
    from rayssl.eval.preprocess import center_square
    from rayssl.storage import filesystem

    fs, _ = filesystem(str(source["uri"]), options)
    rows, images = [], []
    for r in range(len(index)):
        try:
            img, _, _ = decode_image(fs.cat_file(str(paths[r])))
        except (OSError, ValueError):
            img = None  # moved or unreadable since labelling: take the next candidate
        if img is not None:
            rows.append(r)
            images.append(center_square(img, FILE_TILE))
        if len(rows) == n:
            break
    if not rows:
        raise DataError(f"--pseudo-labels: none of the labelled images under {source['uri']} can be read any more")
    return rows, np.stack(images), None


def cdul_labels(args, options: S3Options) -> dict:
    """The ``cdul-labels`` picture; returns the summary (the labels drawn, per image)."""
    import torch

    from rayssl.eval.loading import load_checkpoint
    from rayssl.viz import figures
    from rayssl.viz.models import load_label_store

    for name in ("n", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    ckpt = load_checkpoint(args.checkpoint, options)
    if ckpt.method != "cdul":
        raise ValueError(f"--checkpoint {ckpt.uri}: labels before/after gradient alignment need a CDUL "
                         f"checkpoint, got {ckpt.method}")
    store = load_label_store(ckpt, options)
    uri = args.pseudo_labels or str((ckpt.config.get("cdul") or {}).get("pseudo_labels") or "")
    if not uri:
        raise DataError(f"--checkpoint {ckpt.uri}: records no cdul.pseudo_labels; pass --pseudo-labels URI")
    meta, cols = read_initial_labels(uri, not args.pseudo_labels, options)
    classes = meta["classes"]
    num_rows, c = (int(v) for v in store["latent"].shape)
    if (meta["num_rows"], len(classes)) != (num_rows, c):
        raise DataError(f"--pseudo-labels {uri}: {meta['num_rows']} images x {len(classes)} classes, but the "
                        f"checkpoint's label store is {num_rows} x {c} (the labels of another run?)")
    if store["updates"] == 0:
        raise ValueError(f"--checkpoint {ckpt.uri}: its labels were never updated (cdul.gradient_alignment=false, "
                         f"or saved before the first update epoch); 'after' would equal 'before'")
    if args.top > c:
        raise ValueError(f"--top: must be <= {c} (the number of classes), got {args.top}")
    index = np.asarray(cols["index"], dtype=np.int64)
    _, rows = np.unique(index, return_index=True)  # one row per image, by image index
    rows = rows[(index[rows] >= 0) & (index[rows] < num_rows)]
    rows = rows[store["known"].numpy()[index[rows]]]  # images in both the table and the store
    if not len(rows):
        raise DataError(f"--pseudo-labels {uri}: none of its images has a label in the checkpoint's store")
    cand = index[rows]
    before = np.asarray(cols["soft_label"], dtype=np.float32)[rows]
    after = torch.sigmoid(store["latent"][torch.from_numpy(cand)].float()).numpy()
    order = choose_rows(before, after, cand, args.select, args.seed)
    ids, paths = np.asarray(cols["id"])[rows][order], np.asarray(cols["path"])[rows][order]
    used, images, truth = cdul_images(meta["source"], cand[order], ids, paths, args.n, classes, options)
    pick = order[used]  # candidates drawn, in drawing order
    captions = [str(ids[r]) for r in used]
    if truth is not None:
        captions = [f"{cap}\n" + ", ".join(classes[j] for j in np.flatnonzero(t)) for cap, t in zip(captions, truth)]
    title = (f"CDUL {ckpt.backbone_name}, epoch {ckpt.epoch}: top-{args.top} pseudo-labels\n"
             f"CLIP initialisation vs after gradient alignment ({store['updates']} label updates)")
    drawn = figures.plot_cdul_labels(images, before[pick], after[pick], classes, args.out, top=args.top,
                                     truth=truth, title=title, captions=captions)
    summary = {"picture": "cdul-labels", "out": args.out, "checkpoint": ckpt.uri, "pseudo_labels": uri,
               "select": args.select, "label_updates": store["updates"], "images": len(used),
               "index": [int(i) for i in cand[pick]], "id": [str(ids[r]) for r in used],
               "before": drawn["before"], "after": drawn["after"], "changed": drawn["changed"]}
    if truth is not None:
        summary["truth"] = [[classes[j] for j in np.flatnonzero(t)] for t in truth]
    return summary


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
    s = sub.add_parser("cdul-labels", help="CDUL images with their top pseudo-labels before/after gradient alignment")
    s.add_argument("--checkpoint", required=True, help="CDUL checkpoint or run directory (local or s3://)")
    s.add_argument("--pseudo-labels", default=None, metavar="URI",
                   help="the `python -m rayssl.pseudolabel` output holding the labels before alignment "
                        "(default: the one the run recorded as cdul.pseudo_labels)")
    s.add_argument("--n", type=int, default=8, help="images shown (default 8)")
    s.add_argument("--top", type=int, default=3, help="labels listed per image (default 3)")
    s.add_argument("--select", choices=["changed", "random"], default="changed",
                   help="which images: 'changed' (default) the n whose soft labels moved most (sum over classes "
                        "of |after - before|; ties: lower image index), 'random' n drawn with --seed")
    s.add_argument("--seed", type=int, default=0, help="--select random: which images (default 0)")
    for s in sub.choices.values():
        s.add_argument("--out", required=True, help="PNG file to write (local or s3://)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        add_s3_flags(s, anonymous=False)
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

    if args.command == "cdul-labels":
        return cdul_labels(args, options)
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
    options = S3Options.from_args(args)
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
