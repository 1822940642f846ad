"""CDUL stage 1 as a Ray Data batch-inference job: images -> CLIP global-local soft labels.

Pipeline: rows ``{index, id, path}`` (an image listing, or scene numbers; for tar shards,
one row per image member with its byte range in the shard, ``offset`` and ``length``, read
from the shards' headers) -> a task stage that reads and decodes each image and resizes it
to ``grid * S`` pixels square (S = the CLIP input size; undecodable files are skipped and
counted in ``DataCounts``, as in training) -> ``map_batches`` over a pool of ``ClipLabeller``
actors (one GPU each when the cluster has GPUs) that embed the whole image (resized to S)
and its ``grid x grid`` tiles -> Parquet rows ``index, id, path, soft_label`` (+ ``global``,
``aggregated``; + ``gt`` for generated scenes; + ``offset``, ``length`` for tar members,
which training reads again), plus ``pseudolabels.json`` (classes, settings, number of rows).

The image is squashed to a square before it is cut, so the grid covers it all (CLIP's
own preprocessing would centre-crop it).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from rayssl.data.indexed import byte_ranges, fetch_decode_count
from rayssl.data.labels import image_id
from rayssl.data.pseudo_labels import read_pseudo_labels, scenes_source, write_meta
from rayssl.data.scenes import SHAPES, generate_batch, split_seed
from rayssl.data.sources import DataError, translate_errors
from rayssl.data.stats import DataCounts, report
from rayssl.data.tar import scan_tar_shards
from rayssl.eval.metrics import mean_average_precision
from rayssl.pseudolabel.clip import load_clip
from rayssl.pseudolabel.labels import aggregate_snippets, class_prompts, initial_labels, similarity_vector, snippet_tiles
from rayssl.storage import S3Options, filesystem, pyarrow_filesystem, write_text



def _resize_square(img: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))


def load_scenes(batch: dict, *, seed: int, size: int, side: int, stats=None,
                classes: list[str] | None = None) -> dict:
    """``{"id"}`` scene numbers (from ``ray.data.range``) -> ``{index, id, path, image, gt}``.

    ``gt`` has one column per name of ``classes`` (the user's class list, in its order); it is
    left out when a name is not a scene shape, since there is then no ground truth to give.
    """
    idx = np.asarray(batch["id"], dtype=np.int64)
    scenes = generate_batch(idx, seed=seed, size=size)
    report(stats, Counter(seen=len(idx)))
    out = {"index": idx, "id": scenes["key"], "path": np.asarray([""] * len(idx)),
           "image": np.stack([_resize_square(im, side) for im in scenes["image"]])}
    classes = list(SHAPES) if classes is None else list(classes)
    if all(c in SHAPES for c in classes):
        out["gt"] = scenes["labels"][:, [SHAPES.index(c) for c in classes]]
    return out


def load_files(batch: dict, *, fs, side: int, stats=None, max_bad_fraction: float = 1.0, uri: str = "") -> dict:
    """``{"index", "path"}`` image files, or ``{"index", "path", "id", "offset", "length"}``
    members of tar shards -> decoded ``{index, id, path, image}`` (+ ``offset``, ``length``);
    bad images are skipped and counted (``skipped.read_error`` / ``skipped.decode_error`` ...)."""
    paths = [str(p) for p in batch["path"]]
    starts, ends = byte_ranges(batch)
    good = fetch_decode_count(paths, fs=fs, min_side=1, stats=stats, max_bad_fraction=max_bad_fraction, uri=uri,
                              starts=starts, ends=ends)
    if not good:
        return {}
    rows = [r for r, _ in good]
    ids = [str(batch["id"][r]) for r in rows] if "id" in batch else [image_id(paths[r]) for r in rows]
    out = {"index": np.asarray(batch["index"], dtype=np.int64)[rows], "id": np.asarray(ids),
           "path": np.asarray([paths[r] for r in rows]),
           "image": np.stack([_resize_square(im, side) for _, im in good])}
    if starts is not None:
        out["offset"] = np.asarray(batch["offset"], dtype=np.int64)[rows]
        out["length"] = np.asarray(batch["length"], dtype=np.int64)[rows]
    return out


def listing_table(source, stats=None):
    """The rows the job labels, each with its dense ``index``: ``{index, path}`` per image file,
    or ``{index, path, id, offset, length}`` per image of a tar shard (read from the shards'
    headers; a damaged shard gives the images before the damage and counts
    ``skipped.unreadable_shard``). Parquet shards have no byte address per image: refused."""
    if source.kind == "images":
        paths = list(source.paths)
        return pa.table({"index": pa.array(np.arange(len(paths), dtype=np.int64)), "path": pa.array(paths)})
    if source.kind != "webdataset":
        raise DataError(f"--data: {source.uri} holds {source.kind} shards; the labelling job reads image files, "
                        "uncompressed webdataset .tar shards or 'scenes'")
    with translate_errors(source.uri, source.options, "read"):
        rows, damaged = scan_tar_shards(source.fs, source.paths)
    if damaged:
        report(stats, Counter({"skipped.unreadable_shard": damaged}))
    if not rows:
        raise DataError(f"--data: {source.uri}: no image members found in its {len(source.paths)} tar shard(s) "
                        f"({damaged} unreadable); the labelling job needs uncompressed tars, since it "
                        "addresses each image by its byte range in the shard")
    path, key, off, size = zip(*rows)
    return pa.table({"index": pa.array(np.arange(len(rows), dtype=np.int64)), "path": pa.array(path),
                     "id": pa.array(key), "offset": pa.array(off, pa.int64()), "length": pa.array(size, pa.int64())})


class ClipLabeller:
    """Ray Data actor: CLIP global + snippet similarity vectors and initial soft labels."""

    def __init__(self, clip_model: str, clip_pretrained: str, classes: list[str], template: str, grid: int,
                 gamma: float, lam: float, keep_vectors: bool, threads: int = 1, stats=None):
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = load_clip(clip_model, clip_pretrained, device=self.device)
        self.grid, self.gamma, self.lam, self.keep_vectors, self.stats = grid, gamma, lam, keep_vectors, stats
        self.num_classes = len(classes)
        with torch.no_grad():
            tokens = self.clip.tokenizer(class_prompts(classes, template)).to(self.device)
            self.text = self.clip.model.encode_text(tokens).float()
            # The multiplier (about 100 for trained CLIPs), not the stored log-scale.
            self.scale = float(self.clip.model.logit_scale.exp())
        self.mean = torch.tensor(self.clip.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.clip.std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, batch: dict):
        s, g = self.clip.image_size, self.grid
        with torch.no_grad():
            x = torch.from_numpy(np.array(batch["image"])).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            x = (x - self.mean) / self.std
            b = x.shape[0]
            whole = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            tiles = snippet_tiles(x, g).reshape(b * g * g, 3, s, s)
            feats = self.clip.model.encode_image(torch.cat([whole, tiles])).float()
            sims = similarity_vector(feats, self.text, self.scale)
            glob, snip = sims[:b], sims[b:].reshape(b, g * g, -1)
            agg = aggregate_snippets(snip, self.gamma)
            soft = initial_labels(glob, agg, self.lam)
        c = self.num_classes
        if self.stats is not None:  # which actor labelled how many (the summary counts the actors)
            self.stats.add({f"labeller.{os.getpid()}": b})

        def vec(t):
            return pa.FixedSizeListArray.from_arrays(pa.array(t.cpu().numpy().reshape(-1), pa.float32()), c)

        cols = {"index": pa.array(np.asarray(batch["index"], dtype=np.int64)),
                "id": pa.array([str(v) for v in batch["id"]]), "path": pa.array([str(v) for v in batch["path"]]),
                "soft_label": vec(soft)}
        for name in ("offset", "length"):  # a tar member's byte range: training reads it again
            if name in batch:
                cols[name] = pa.array(np.asarray(batch[name], dtype=np.int64))
        if self.keep_vectors:
            cols["global"], cols["aggregated"] = vec(glob), vec(agg)
        if "gt" in batch:
            cols["gt"] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(batch["gt"], dtype=np.uint8).reshape(-1)), c)
        return pa.table(cols)


@dataclass
class LabelJob:
    """What the labelling job does (the options of ``rayssl label``)."""

    out: str
    clip_model: str
    clip_pretrained: str
    template: str = "a photo of a {}"
    grid: int = 3  # snippets per side
    gamma: float = 0.0  # aggregation threshold: max if >= gamma else min
    lam: float = 0.0  # weight of |global - aggregated| in the initial label
    num_actors: int = 2
    batch_size: int = 32
    keep_vectors: bool = True  # store the global and aggregated vectors too
    truth: dict[str, tuple[str, ...]] | None = None  # ground truth (truth_key -> classes) to score the labels with
    truth_key: str = "id"  # "path": the data's own class folders (file names may repeat across them)
    num_scenes: int = 2048  # --data scenes: how many
    scenes_size: int = 64
    scenes_split: str = "train"
    seed: int = 0
    max_bad_fraction: float = 0.5
    options: S3Options = field(default_factory=S3Options)  # the store of --out and --labels (signed)


def run_job(job: LabelJob, classes: list[str], source, use_gpu: bool, actor_cpus: float) -> dict:
    """Build and run the job on the connected Ray (``source``: the resolved data, None for the
    built-in scenes; the actors placed as the command decided), write Parquet + meta, and
    return the summary."""
    t0 = time.perf_counter()
    image_size = load_clip(job.clip_model, job.clip_pretrained).image_size  # fail here, not in an actor
    side = image_size * job.grid
    stats = DataCounts()
    if source is None:  # generated scenes
        seed = split_seed(job.seed, job.scenes_split)
        n = job.num_scenes
        ds = ray.data.range(n, override_num_blocks=max(1, min(64, n // job.batch_size)))
        ds = ds.map_batches(
            load_scenes, batch_size=job.batch_size,
            fn_kwargs={"seed": seed, "size": job.scenes_size, "side": side, "stats": stats, "classes": classes})
        meta_source = scenes_source(seed, job.scenes_size, n)
        num_rows = n
    else:
        table = listing_table(source, stats)
        num_rows = table.num_rows
        # One read batch per block (at most ~2000 blocks): the actor pool gets work in small
        # bundles, so every actor of the pool is fed.
        per = job.batch_size * max(1, -(-num_rows // (2000 * job.batch_size)))
        blocks = [table.slice(i, per) for i in range(0, num_rows, per)]
        ds = ray.data.from_arrow(blocks).map_batches(
            load_files, batch_size=job.batch_size,
            fn_kwargs={"fs": source.fs, "side": side, "stats": stats, "uri": source.uri,
                       "max_bad_fraction": job.max_bad_fraction})
        meta_source = {"kind": source.kind, "uri": source.uri}
    ds = ds.map_batches(
        ClipLabeller, batch_size=job.batch_size, compute=ray.data.ActorPoolStrategy(size=job.num_actors),
        num_gpus=1 if use_gpu else 0, num_cpus=actor_cpus,
        fn_constructor_kwargs={"clip_model": job.clip_model, "clip_pretrained": job.clip_pretrained,
                               "classes": classes, "template": job.template, "grid": job.grid,
                               "gamma": job.gamma, "lam": job.lam, "keep_vectors": job.keep_vectors,
                               "threads": max(1, int(actor_cpus)), "stats": stats},
    )
    options = job.options.signed()
    fs, root = filesystem(job.out, options)
    ds.write_parquet(root, filesystem=pyarrow_filesystem(fs))
    meta = {"classes": classes, "template": job.template, "grid": job.grid, "gamma": job.gamma, "lam": job.lam,
            "clip_model": job.clip_model,
            "clip_pretrained": os.path.basename(job.clip_pretrained) if os.path.isfile(job.clip_pretrained)
            else job.clip_pretrained,
            "num_rows": num_rows, "source": meta_source}
    write_meta(job.out, meta, options)
    counts = stats.get()
    by_actor = {k: v for k, v in counts.items() if k.startswith("labeller.")}
    summary = {"out": job.out, "classes": len(classes), "num_actors": job.num_actors,
               "actors_used": len(by_actor), "gpu": use_gpu,
               "data": {k: v for k, v in counts.items() if k not in by_actor}}
    summary.update(score_output(job.out, classes, job.truth, options, truth_key=job.truth_key))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    write_text(f"{job.out.rstrip('/')}/summary.json", json.dumps(summary, indent=1), options)
    return summary


def score_output(out: str, classes: list[str], truth: dict[str, tuple[str, ...]] | None = None,
                 options: S3Options | None = None, truth_key: str = "id") -> dict:
    """Rows written and, with ground truth (scenes' ``gt`` column, or ``truth``, read before the
    job: classes by the rows' ``truth_key``, ``id`` or ``path``), the mAP of the global,
    aggregated and final pseudo-labels."""
    fs, root = filesystem(out, options)
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    schema = pq.read_schema(files[0], filesystem=pyarrow_filesystem(fs)) if files else None
    names = schema.names if schema is not None else []
    # The path column only when the ground truth is matched by it: a large table's longest column.
    wanted = dict.fromkeys(("index", "id", "soft_label", "global", "aggregated", "gt", truth_key))
    cols = [c for c in wanted if c in names]
    _, data = read_pseudo_labels(out, columns=cols, options=options)
    result: dict = {"images_labelled": int(len(data["index"]))}
    gt = None
    if "gt" in data:
        gt = data["gt"].astype(np.float32)
    elif truth:
        pos = {c: j for j, c in enumerate(classes)}
        gt = np.zeros((len(data[truth_key]), len(classes)), dtype=np.float32)
        for r, i in enumerate(data[truth_key]):
            for c in truth.get(str(i), ()):
                if c in pos:
                    gt[r, pos[c]] = 1.0
    if gt is not None and gt.sum() > 0:
        for name, key in (("global", "map_global"), ("aggregated", "map_aggregated"), ("soft_label", "map_final")):
            if name in data:
                result[key] = round(mean_average_precision(data[name], gt), 4)
    return result
