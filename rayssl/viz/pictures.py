"""The pictures of ``rayssl viz``, each drawn from a run or a checkpoint into one PNG file.

``draw_curves`` redraws ``<run>/metrics.jsonl`` (training writes ``<run>/curves.png`` itself
after every epoch). ``draw_prototypes`` (SwAV): how many images each prototype wins, most used
first; a collapse is one tall bar. ``draw_mls_positives`` (MLS/MoCo): query images and the k
queue images their backbone feature picks as positive labels. Images come from held-out
built-in scenes (never the training stream) or from a folder / s3:// prefix of image files.
``draw_cdul_labels`` (CDUL): training images with their top pseudo-labels before gradient
alignment (the CLIP labels of ``python -m rayssl.pseudolabel``, whose output the run records as
``cdul.pseudo_labels``) and after it (the label store saved in the checkpoint); the images are
read from where the label table says they are (built-in scenes are regenerated, with their
true classes). Each returns a summary dict of what it drew. No Ray.
"""

from __future__ import annotations

import numpy as np
import torch
import yaml

from rayssl.checkpoint import load_checkpoint
from rayssl.data.decode import decode_image
from rayssl.data.pseudo_labels import read_pseudo_labels
from rayssl.data.scenes import SHAPES, generate_batch, split_seed
from rayssl.data.sources import DataError, resolve_source
from rayssl.eval.preprocess import center_square
from rayssl.methods import get_method
from rayssl.methods.mls import MLS
from rayssl.methods.swav import SwAV
from rayssl.storage import S3Options, filesystem, read_text
from rayssl.viz.tracking import read_history
from rayssl.viz import figures
from rayssl.viz.models import load_label_store, load_method, mls_positives, swav_assignments

__all__ = ["draw_cdul_labels", "draw_curves", "draw_mls_positives", "draw_prototypes"]


def draw_curves(run: str, out: str, options: S3Options | None = None) -> dict:
    """Loss / lr / images/s / metric of a run against the epoch."""
    history = read_history(run, options)
    if not history:
        raise DataError(f"--run {run}: no metrics.jsonl (not a rayssl run, or no epoch finished yet)")
    metric = None
    try:
        metric = get_method(yaml.safe_load(read_text(f"{run.rstrip('/')}/config.yaml", options))["run"]["method"]).metric
    except Exception:  # noqa: BLE001 - the curves still draw without the metric panel
        pass
    series = figures.plot_training_curves(history, out, metric, title=run, options=options)
    return {"picture": "curves", "out": out, "epochs": len(history), "panels": [k for k, v in series.items() if v]}


def _model(checkpoint: str, image_size: int | None, options: S3Options | None):
    ckpt = load_checkpoint(checkpoint, options)
    return ckpt, load_method(ckpt), image_size or ckpt.image_size, ckpt.config["data"]["scenes_image_size"]


def draw_prototypes(checkpoint: str, out: str, *, data: str = "scenes", num_images: int = 1024, seed: int = 0,
                    image_size: int | None = None, options: S3Options | None = None) -> dict:
    """SwAV: how many of ``num_images`` images each prototype wins."""
    ckpt, model, size, scene_size = _model(checkpoint, image_size, options)
    if not isinstance(model, SwAV):
        raise ValueError(f"--checkpoint {ckpt.uri}: prototype usage needs a SwAV checkpoint, got {ckpt.method}")
    images, _ = sample_images(data, num_images, size, scene_size, seed, options)
    counts = figures.prototype_usage(swav_assignments(model, images), model.cfg.num_prototypes)
    stats = figures.plot_prototype_usage(counts, out, title=f"{ckpt.method} {ckpt.backbone_name}, epoch {ckpt.epoch}",
                                         options=options)
    return {"picture": "prototypes", "out": out, "images": len(images), **stats}


def draw_mls_positives(checkpoint: str, out: str, *, data: str = "scenes", queries: int = 6, gallery: int = 512,
                       k: int | None = None, seed: int = 0, image_size: int | None = None,
                       options: S3Options | None = None) -> dict:
    """MLS/MoCo: ``queries`` images and the ``k`` images of a ``gallery`` (playing the queue) that
    their backbone features pick as positive labels (default k: min(mls.k, 8))."""
    ckpt, model, size, scene_size = _model(checkpoint, image_size, options)
    if not isinstance(model, MLS):
        raise ValueError(f"--checkpoint {ckpt.uri}: queue positives need an MLS/MoCo checkpoint, got {ckpt.method}")
    k = k or min(model.cfg.k, 8)
    images, labels = sample_images(data, queries + gallery, size, scene_size, seed, options)
    idx, sims = mls_positives(model, images[:queries], images[queries:], k)
    stats = figures.plot_positives_grid(images[:queries], images[queries:], idx, sims, out,
                                        labels[:queries] if labels else None,
                                        labels[queries:] if labels else None,
                                        title=f"{ckpt.method} {ckpt.backbone_name}, epoch {ckpt.epoch}",
                                        options=options)
    return {"picture": "mls-positives", "out": out, **stats}


def sample_images(data: str, n: int, size: int, scene_size: int, seed: int,
                  options: S3Options | None) -> tuple[np.ndarray, list[set] | None]:
    """``n`` images (uint8 (n, size, size, 3)) and, for the scenes, their class-name sets."""
    if data == "scenes":
        b = generate_batch(range(n), seed=split_seed(seed, "eval-test"), size=scene_size)
        images = b["image"] if scene_size == size else np.stack([center_square(im, size) for im in b["image"]])
        return images, [{SHAPES[c] for c in np.flatnonzero(row)} for row in b["labels"]]
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


def read_initial_labels(uri: str, recorded: bool, options: S3Options | None) -> tuple[dict, dict]:
    """The labelling job's table (meta, columns index/id/path/soft_label); DataError (one line)
    when it cannot be read. ``recorded``: ``uri`` comes from the checkpoint's config."""
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
                options: S3Options | None) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """The first ``n`` readable images among the candidate rows (in order), read from where the
    label table says they are. Returns (rows used, uint8 (n, H, W, 3), truth (n, C) or None)."""
    kind = source.get("kind")
    if kind == "scenes":
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


def draw_cdul_labels(checkpoint: str, out: str, *, pseudo_labels: str | None = None, n: int = 8, top: int = 3,
                     select: str = "changed", seed: int = 0, options: S3Options | None = None) -> dict:
    """The ``cdul-labels`` picture: CDUL images with their top pseudo-labels before gradient
    alignment (the labelling job's table) and after it (the checkpoint's label store); returns
    the summary (the labels drawn, per image)."""
    for name, value in (("n", n), ("top", top)):
        if value < 1:
            raise ValueError(f"--{name}: must be >= 1, got {value}")
    ckpt = load_checkpoint(checkpoint, options)
    if ckpt.method != "cdul":
        raise ValueError(f"--checkpoint {ckpt.uri}: labels before/after gradient alignment need a CDUL "
                         f"checkpoint, got {ckpt.method}")
    store = load_label_store(ckpt)
    uri = pseudo_labels or str((ckpt.config.get("cdul") or {}).get("pseudo_labels") or "")
    if not uri:
        raise DataError(f"--checkpoint {ckpt.uri}: records no cdul.pseudo_labels; pass --pseudo-labels URI")
    meta, cols = read_initial_labels(uri, not pseudo_labels, options)
    classes = meta["classes"]
    num_rows, c = (int(v) for v in store["latent"].shape)
    if (meta["num_rows"], len(classes)) != (num_rows, c):
        raise DataError(f"--pseudo-labels {uri}: {meta['num_rows']} images x {len(classes)} classes, but the "
                        f"checkpoint's label store is {num_rows} x {c} (the labels of another run?)")
    if store["updates"] == 0:
        raise ValueError(f"--checkpoint {ckpt.uri}: its labels were never updated (cdul.gradient_alignment=false, "
                         f"or saved before the first update epoch); 'after' would equal 'before'")
    if top > c:
        raise ValueError(f"--top: must be <= {c} (the number of classes), got {top}")
    index = np.asarray(cols["index"], dtype=np.int64)
    _, rows = np.unique(index, return_index=True)  # one row per image, by image index
    rows = rows[(index[rows] >= 0) & (index[rows] < num_rows)]
    rows = rows[store["known"].numpy()[index[rows]]]  # images in both the table and the store
    if not len(rows):
        raise DataError(f"--pseudo-labels {uri}: none of its images has a label in the checkpoint's store")
    cand = index[rows]
    before = np.asarray(cols["soft_label"], dtype=np.float32)[rows]
    after = torch.sigmoid(store["latent"][torch.from_numpy(cand)].float()).numpy()
    order = choose_rows(before, after, cand, select, seed)
    ids, paths = np.asarray(cols["id"])[rows][order], np.asarray(cols["path"])[rows][order]
    used, images, truth = cdul_images(meta["source"], cand[order], ids, paths, n, classes, options)
    pick = order[used]  # candidates drawn, in drawing order
    captions = [str(ids[r]) for r in used]
    if truth is not None:
        captions = [f"{cap}\n" + ", ".join(classes[j] for j in np.flatnonzero(t)) for cap, t in zip(captions, truth)]
    title = (f"CDUL {ckpt.backbone_name}, epoch {ckpt.epoch}: top-{top} pseudo-labels\n"
             f"CLIP initialisation vs after gradient alignment ({store['updates']} label updates)")
    drawn = figures.plot_cdul_labels(images, before[pick], after[pick], classes, out, top=top,
                                     truth=truth, title=title, captions=captions, options=options)
    summary = {"picture": "cdul-labels", "out": out, "checkpoint": ckpt.uri, "pseudo_labels": uri,
               "select": select, "label_updates": store["updates"], "images": len(used),
               "index": [int(i) for i in cand[pick]], "id": [str(ids[r]) for r in used],
               "before": drawn["before"], "after": drawn["after"], "changed": drawn["changed"]}
    if truth is not None:
        summary["truth"] = [[classes[j] for j in np.flatnonzero(t)] for t in truth]
    return summary
