"""CDUL stage 1 as a Ray Data batch-inference job: images -> CLIP global-local soft labels.

Pipeline: rows ``{index, id, path}`` (an image listing, or scene numbers; for tar shards,
one row per image member with its byte range in the shard, ``offset`` and ``length``, read
from the shards' headers) -> a task stage that reads and decodes each image and resizes it
to ``grid * S`` pixels square (S = the CLIP input size; undecodable files are skipped and
counted in ``DataStats``, as in training) -> ``map_batches`` over a pool of ``ClipLabeller``
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

import numpy as np
import ray



def _resize_square(img: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))


def load_scenes(batch: dict, *, seed: int, size: int, side: int, stats=None,
                classes: list[str] | None = None) -> dict:
    """``{"id"}`` scene numbers (from ``ray.data.range``) -> ``{index, id, path, image, gt}``.

    ``gt`` has one column per name of ``classes`` (the user's class list, in its order); it is
    left out when a name is not a scene shape, since there is then no ground truth to give.
    """
    from rayssl.data.pipeline import _report
    from rayssl.data.scenes import SHAPES, generate_batch

    idx = np.asarray(batch["id"], dtype=np.int64)
    scenes = generate_batch(idx, seed=seed, size=size)
    _report(stats, Counter(seen=len(idx)))
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
    from rayssl.data.indexed import byte_ranges, fetch_decode_count
    from rayssl.data.sources import _image_id

    paths = [str(p) for p in batch["path"]]
    starts, ends = byte_ranges(batch)
    good = fetch_decode_count(paths, fs=fs, min_side=1, stats=stats, max_bad_fraction=max_bad_fraction, uri=uri,
                              starts=starts, ends=ends)
    if not good:
        return {}
    rows = [r for r, _ in good]
    ids = [str(batch["id"][r]) for r in rows] if "id" in batch else [_image_id(paths[r]) for r in rows]
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
    import pyarrow as pa

    from rayssl.data.pipeline import _report
    from rayssl.data.sources import DataError, scan_tar_shards, translate_errors

    if source.kind == "images":
        paths = list(source.paths)
        return pa.table({"index": pa.array(np.arange(len(paths), dtype=np.int64)), "path": pa.array(paths)})
    if source.kind != "webdataset":
        raise DataError(f"--data: {source.uri} holds {source.kind} shards; the labelling job reads image files, "
                        "uncompressed webdataset .tar shards or 'scenes'")
    with translate_errors(source.uri, source.options, "read"):
        rows, damaged = scan_tar_shards(source.fs, source.paths)
    if damaged:
        _report(stats, Counter({"skipped.unreadable_shard": damaged}))
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
        import torch

        from rayssl.pseudolabel.clip import load_clip
        from rayssl.pseudolabel.labels import class_prompts

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
        import pyarrow as pa
        import torch
        import torch.nn.functional as F

        from rayssl.pseudolabel.labels import aggregate_snippets, initial_labels, similarity_vector, snippet_tiles

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
            self.stats.add.remote({f"labeller.{os.getpid()}": b})

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


def actor_resources(cluster: dict, num_actors: int, use_gpu: bool | None) -> tuple[bool, float]:
    """GPU per actor when the cluster has GPUs; CPUs per actor leave >= 1 CPU to the readers."""
    gpus = cluster.get("GPU", 0)
    use = use_gpu if use_gpu is not None else gpus >= 1
    if use and gpus < 1:
        raise ValueError("--use-gpu: true, but the Ray cluster has no GPU")
    cpus = cluster.get("CPU", 1)
    return use, round(min(1.0, max(0.1, (cpus - 1.0) / num_actors)), 2)


def run_job(args, classes: list[str], source, stats_cls=None) -> dict:
    """Build and run the job, write Parquet + meta, return the summary (see ``__main__``)."""
    from rayssl.data.pipeline import DataStats
    from rayssl.data.scenes import split_seed
    from rayssl.pseudolabel.clip import load_clip
    from rayssl.pseudolabel.store import scenes_source, write_meta
    from rayssl.storage import filesystem, pyarrow_filesystem, write_text

    t0 = time.perf_counter()
    image_size = load_clip(args.clip_model, args.clip_pretrained).image_size  # fail here, not in an actor
    side = image_size * args.grid
    stats = DataStats.remote()
    if source is None:  # generated scenes
        seed = split_seed(args.seed, args.scenes_split)
        n = args.num_scenes
        ds = ray.data.range(n, override_num_blocks=max(1, min(64, n // args.batch_size)))
        ds = ds.map_batches(
            load_scenes, batch_size=args.batch_size,
            fn_kwargs={"seed": seed, "size": args.scenes_size, "side": side, "stats": stats,
                       "classes": classes})
        meta_source = scenes_source(seed, args.scenes_size, n)
        num_rows = n
    else:
        table = listing_table(source, stats)
        num_rows = table.num_rows
        # One read batch per block (at most ~2000 blocks): the actor pool gets work in small
        # bundles, so every actor of the pool is fed.
        per = args.batch_size * max(1, -(-num_rows // (2000 * args.batch_size)))
        blocks = [table.slice(i, per) for i in range(0, num_rows, per)]
        ds = ray.data.from_arrow(blocks).map_batches(
            load_files, batch_size=args.batch_size,
            fn_kwargs={"fs": source.fs, "side": side, "stats": stats, "uri": source.uri,
                       "max_bad_fraction": args.max_bad_fraction})
        meta_source = {"kind": source.kind, "uri": source.uri}
    use_gpu, cpus = actor_resources(ray.cluster_resources(), args.num_actors,
                                    {"auto": None, "true": True, "false": False}[args.use_gpu])
    ds = ds.map_batches(
        ClipLabeller, batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=args.num_actors),
        num_gpus=1 if use_gpu else 0, num_cpus=cpus,
        fn_constructor_kwargs={"clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained,
                               "classes": classes, "template": args.template, "grid": args.grid,
                               "gamma": args.gamma, "lam": args.lam, "keep_vectors": not args.no_vectors,
                               "threads": max(1, int(cpus)), "stats": stats},
    )
    fs, root = filesystem(args.out)
    ds.write_parquet(root, filesystem=pyarrow_filesystem(fs))
    meta = {"classes": classes, "template": args.template, "grid": args.grid, "gamma": args.gamma, "lam": args.lam,
            "clip_model": args.clip_model,
            "clip_pretrained": os.path.basename(args.clip_pretrained) if os.path.isfile(args.clip_pretrained)
            else args.clip_pretrained,
            "num_rows": num_rows, "source": meta_source}
    write_meta(args.out, meta)
    counts = ray.get(stats.get.remote())
    by_actor = {k: v for k, v in counts.items() if k.startswith("labeller.")}
    summary = {"out": args.out, "classes": len(classes), "num_actors": args.num_actors,
               "actors_used": len(by_actor), "gpu": use_gpu,
               "data": {k: v for k, v in counts.items() if k not in by_actor}}
    summary.update(score_output(args.out, classes, getattr(args, "labels", None)))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    write_text(f"{args.out.rstrip('/')}/summary.json", json.dumps(summary, indent=1))
    return summary


def score_output(out: str, classes: list[str], labels_uri: str | None = None) -> dict:
    """Rows written and, with ground truth (scenes' ``gt`` column or a labels table), the mAP of
    the global, aggregated and final pseudo-labels."""
    import pyarrow.parquet as pq

    from rayssl.eval.metrics import mean_average_precision
    from rayssl.pseudolabel.store import read_pseudo_labels
    from rayssl.storage import filesystem, pyarrow_filesystem

    fs, root = filesystem(out)
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    schema = pq.read_schema(files[0], filesystem=pyarrow_filesystem(fs)) if files else None
    names = schema.names if schema is not None else []
    cols = [c for c in ("index", "id", "soft_label", "global", "aggregated", "gt") if c in names]
    _, data = read_pseudo_labels(out, columns=cols)
    result: dict = {"images_labelled": int(len(data["index"]))}
    gt = None
    if "gt" in data:
        gt = data["gt"].astype(np.float32)
    elif labels_uri:
        from rayssl.data.sources import load_labels

        table = load_labels(labels_uri)
        pos = {c: j for j, c in enumerate(classes)}
        gt = np.zeros((len(data["id"]), len(classes)), dtype=np.float32)
        for r, i in enumerate(data["id"]):
            for c in table.get(str(i), ()):
                if c in pos:
                    gt[r, pos[c]] = 1.0
    if gt is not None and gt.sum() > 0:
        for name, key in (("global", "map_global"), ("aggregated", "map_aggregated"), ("soft_label", "map_final")):
            if name in data:
                result[key] = round(mean_average_precision(data[name], gt), 4)
    return result
