"""Write image shards (WebDataset ``.tar`` or Parquet) in parallel on Ray.

Command line: ``python -m rayssl.data.shards`` (``rayssl.cli.shards``).

Sources: a folder or ``s3://`` prefix of image files (copied byte for byte: broken files
stay broken, the training pipeline counts them), or ``scenes``, the built-in generated
dataset, written with its labels so the shards double as a labelled evaluation set:
``rayssl eval --data OUT`` reads ``<prefix>-labels.csv`` through the manifest.

Layout under ``--out`` (local folder or ``s3://`` prefix)::

    train-000000.tar ...        (or train-000000.parquet ...)
    train-labels.csv            id,classes of each labelled sample (scenes, or files with --labels)
    manifest.json               {"format", "num_samples", "shards": [{"name", "samples"}], "labels", ...}

WebDataset members of one sample share a key: ``<key>.png`` (or the source file's own
extension), ``<key>.json`` (``{"classes": [...], "dominant": ..., "caption": ..., "label": i}``
for scenes, ``{"path": ...}`` plus ``classes`` from ``--labels`` for files), ``<key>.cls``
(the dominant class index) and ``<key>.txt`` (the caption) for scenes. Parquet shards hold
the columns ``key``, ``image`` (encoded bytes) and the same label fields.

One Ray task writes one shard. A shard appears whole or not at all (a local shard is
written to a temporary name and renamed; an S3 object only exists once its upload
completes) and ``manifest.json`` is written last, after every shard. Existing shards are
never overwritten unless ``--overwrite`` is given, which first removes the old
``<prefix>-NNNNNN.<ext>`` shards, labels table and manifest so no stale shard survives.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import ray

from rayssl.data.formats import encode_image, extension
from rayssl.data.labels import image_id, load_labels, own_folder_labels
from rayssl.data.scenes import SHAPES, generate_scene, split_seed
from rayssl.data.sources import MANIFEST_NAME, resolve_source, translate_errors
from rayssl.storage import S3Options, filesystem, is_local_fs, is_s3, options_for

FORMATS = {"webdataset": "tar", "parquet": "parquet"}


class ShardError(ValueError):
    """The shards cannot be written as asked (existing shards, bad arguments); one line."""


@dataclass
class ShardTask:
    """What one Ray task writes: shard ``name`` holding scenes ``indices`` or ``files``."""

    name: str
    path: str  # in the output filesystem's form
    fmt: str
    indices: list[int] = field(default_factory=list)  # scenes
    files: list[tuple[str, str]] = field(default_factory=list)  # (key, source path)
    classes: list[tuple[str, ...]] | None = None  # each file's classes, with --labels


# ----------------------------------------------------------------------------- samples


def scene_samples(indices: Sequence[int], seed: int, size: int, image_format: str) -> Iterator[dict]:
    """Scenes -> samples ``{"key", "ext", "image", "classes", "dominant", "label", "caption"}``."""
    stream = split_seed(seed, "train")  # the stream the built-in training data uses
    for i in indices:
        scene = generate_scene(int(i), seed=stream, size=size)
        yield {"key": f"scene-{int(i):06d}", "ext": image_format, "image": encode_image(scene.image, image_format),
               "classes": list(scene.classes), "dominant": scene.dominant,
               "label": SHAPES.index(scene.dominant), "caption": scene.caption}


def file_samples(files: Sequence[tuple[str, str]], fs, root: str,
                 classes: Sequence[tuple[str, ...]] | None = None) -> Iterator[dict]:
    """Image files -> samples, bytes untouched (the training pipeline judges them); ``classes``:
    each file's, from ``--labels``."""
    paths = [p for _, p in files]
    blobs = fs.cat_ranges(list(paths), None, None, on_error="return")
    for n, ((key, path), blob) in enumerate(zip(files, blobs)):
        if isinstance(blob, BaseException):
            raise OSError(f"cannot read {path}: {type(blob).__name__}")
        rel = path[len(root):].lstrip("/") if path.startswith(root) else posixpath.basename(path)
        sample = {"key": key, "ext": extension(path) or "bin", "image": bytes(blob), "path": rel}
        if classes is not None:
            sample["classes"] = list(classes[n])
        yield sample


# ----------------------------------------------------------------------------- writers


@contextmanager
def atomic_open(fs, path: str):
    """A binary writer whose file appears only when complete (local: temp name + rename)."""
    if is_local_fs(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with fs.open(path, "wb") as f:  # S3: the object exists once the upload completes
            yield f


_META_KEYS = ("classes", "dominant", "label", "caption", "path")


def write_tar(f, samples: Iterator[dict]) -> int:
    """Samples -> a WebDataset tar stream on ``f``; returns the number of samples."""
    n = 0
    mtime = int(time.time())
    with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            members = [(f"{s['key']}.{s['ext']}", s["image"])]
            meta = {k: s[k] for k in _META_KEYS if k in s}
            if meta:
                members.append((f"{s['key']}.json", json.dumps(meta).encode("utf-8")))
            if "label" in s:
                members.append((f"{s['key']}.cls", str(s["label"]).encode("ascii")))
            if "caption" in s:
                members.append((f"{s['key']}.txt", s["caption"].encode("utf-8")))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                tf.addfile(info, io.BytesIO(data))
            n += 1
    return n


def write_parquet(f, samples: Iterator[dict]) -> int:
    """Samples -> one Parquet file on ``f`` (columns key, image and the label fields)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(samples)  # one shard's worth: bounded by --shard-size
    cols: dict = {"key": pa.array([r["key"] for r in rows], pa.string()),
                  "image": pa.array([r["image"] for r in rows], pa.binary())}
    if rows and "classes" in rows[0]:
        cols["classes"] = pa.array([r["classes"] for r in rows], pa.list_(pa.string()))
    for name, typ in (("dominant", pa.string()), ("label", pa.int64()), ("caption", pa.string()),
                      ("path", pa.string())):
        if rows and name in rows[0]:
            cols[name] = pa.array([r[name] for r in rows], typ)
    # Images are already compressed: storing the column uncompressed saves CPU on both ends.
    pq.write_table(pa.table(cols), f, compression={"image": "NONE", **{c: "zstd" for c in cols if c != "image"}})
    return len(rows)


def write_one_shard(task: ShardTask, out_fs, *, seed: int = 0, size: int = 64, image_format: str = "png",
                    source_fs=None, source_root: str = "") -> tuple[str, int, list[tuple[str, list[str]]]]:
    """Write one shard; returns (name, samples, (key, classes) of its labelled samples). Runs
    inside a Ray task (or inline)."""
    if task.indices:
        samples = scene_samples(task.indices, seed, size, image_format)
    else:
        samples = file_samples(task.files, source_fs, source_root, task.classes)
    labelled: list[tuple[str, list[str]]] = []

    def noted(samples):
        for s in samples:
            if s.get("classes"):
                labelled.append((s["key"], list(s["classes"])))
            yield s

    writer = write_tar if task.fmt == "webdataset" else write_parquet
    with atomic_open(out_fs, task.path) as f:
        n = writer(f, noted(samples))
    return task.name, n, labelled


# ----------------------------------------------------------------------------- planning


def shard_name(prefix: str, i: int, fmt: str) -> str:
    return f"{prefix}-{i:06d}.{FORMATS[fmt]}"


def labels_name(prefix: str) -> str:
    return f"{prefix}-labels.csv"


def labels_csv(rows: Sequence[tuple[str, Sequence[str]]]) -> bytes:
    """``id,classes`` (classes joined by ``|``), the table ``rayssl.data.labels.load_labels`` reads."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["id", "classes"])
    out.writerows((key, "|".join(classes)) for key, classes in rows)
    return buf.getvalue().encode("utf-8")


def _existing_shards(out_fs, out_path: str, prefix: str) -> list[str]:
    """Shard files, their labels table and the manifest directly under the output location."""
    try:
        entries = out_fs.ls(out_path, detail=False)
    except FileNotFoundError as exc:
        if "bucket" in str(exc).lower():
            raise
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+\.(tar|parquet)|labels\.csv)$")
    return sorted(p for p in entries
                  if pattern.match(posixpath.basename(p)) or posixpath.basename(p) == MANIFEST_NAME)


def _file_keys(paths: list[str]) -> list[str]:
    """Sample keys for files: the file stem, or the relative path when stems collide."""
    stems = [image_id(p) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:08d}-{s}" for i, s in enumerate(stems)]


@dataclass
class ShardPlan:
    """What ``write_planned`` will write: checked before any shard is (``plan_shards``)."""

    source: str
    out: str
    fmt: str
    shard_size: int
    tasks: list[ShardTask]
    out_fs: object
    out_path: str
    existing: list[str]  # shards already there, removed first (--overwrite)
    src: object | None  # the resolved file source (None for scenes)
    scene_size: int = 64
    seed: int = 0
    image_format: str = "png"
    s3: S3Options = field(default_factory=S3Options)
    prefix: str = "train"


def plan_shards(source: str, out: str, fmt: str = "webdataset", shard_size: int = 1000, *, num_scenes: int = 0,
                scene_size: int = 64, seed: int = 0, image_format: str = "png", prefix: str = "train",
                labels: str = "", overwrite: bool = False, s3: S3Options | None = None) -> ShardPlan:
    """Check the arguments, the source and the output location (no Ray); ShardError/DataError
    name the option."""
    if s3 is None:  # both ends must be reachable: refuse an s3:// source or --out without options
        s3 = options_for(out if is_s3(out) else source, None)
    if fmt not in FORMATS:
        raise ShardError(f"--format: choose webdataset or parquet, got {fmt!r}")
    if shard_size < 1:
        raise ShardError(f"--shard-size: must be >= 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ShardError(f"--prefix: use letters, digits, '-' and '_' only, got {prefix!r}")
    out_fs, out_path = filesystem(out, s3.signed())
    out_path = out_path.rstrip("/")
    with translate_errors(out, s3.signed(), "write to", what="--out"):
        existing = _existing_shards(out_fs, out_path, prefix)
    if existing and not overwrite:
        raise ShardError(f"--out: {out} already holds {len(existing)} file(s) of '{prefix}' shards "
                         f"(e.g. {posixpath.basename(existing[0])}); refusing to overwrite them. "
                         "Choose another --out or pass --overwrite")
    common = {"source": source, "out": out, "fmt": fmt, "shard_size": shard_size, "out_fs": out_fs,
              "out_path": out_path, "existing": existing, "scene_size": scene_size, "seed": seed,
              "image_format": image_format, "s3": s3, "prefix": prefix}
    if source == "scenes":
        if num_scenes < 1:
            raise ShardError("--num-scenes: must be >= 1 with --source scenes")
        n_shards = -(-num_scenes // shard_size)
        tasks = [ShardTask(shard_name(prefix, i, fmt), f"{out_path}/{shard_name(prefix, i, fmt)}", fmt,
                           indices=list(range(i * shard_size, min(num_scenes, (i + 1) * shard_size))))
                 for i in range(n_shards)]
        return ShardPlan(tasks=tasks, src=None, **common)
    src = resolve_source(source, s3)
    if src.kind != "images":
        raise ShardError(f"--source: {source} already holds {src.kind} shards; give a folder or prefix of images")
    paths = src.paths
    files = list(zip(_file_keys(paths), paths))
    classes = _file_classes(labels, source, paths, s3) if labels else None
    tasks = []
    for i in range(-(-len(paths) // shard_size)):
        part = slice(i * shard_size, (i + 1) * shard_size)
        tasks.append(ShardTask(shard_name(prefix, i, fmt), f"{out_path}/{shard_name(prefix, i, fmt)}", fmt,
                               files=files[part], classes=classes[part] if classes is not None else None))
    return ShardPlan(tasks=tasks, src=src, **common)


def _file_classes(labels: str, source: str, paths: list[str], s3: S3Options) -> list[tuple[str, ...]]:
    """Each file's classes from ``--labels``: the source's own class folders (file names may
    repeat across them), or a table or other tree matched by file stem."""
    found = own_folder_labels(labels, source, paths, s3)
    if found is not None:
        return [(found[p][1],) if p in found else () for p in paths]
    table = load_labels(labels, s3)
    return [table.get(image_id(p), ()) for p in paths]


def write_planned(plan: ShardPlan) -> dict:
    """Write the planned shards in parallel (one Ray task per shard, on the connected Ray) and
    then the manifest; returns the manifest."""
    out, s3, src = plan.out, plan.s3, plan.src
    with translate_errors(out, s3.signed(), "write to", what="--out"):
        for path in plan.existing:  # --overwrite: no stale shard from an earlier, larger run survives
            plan.out_fs.rm_file(path)
    remote = ray.remote(num_cpus=1, max_retries=2)(write_one_shard)
    source_root = src.fs._strip_protocol(src.uri).rstrip("/") if src is not None else ""
    kwargs = {"seed": plan.seed, "size": plan.scene_size, "image_format": plan.image_format,
              "source_fs": src.fs if src is not None else None, "source_root": source_root}
    results = ray.get([remote.remote(t, plan.out_fs, **kwargs) for t in plan.tasks])
    labelled = [row for _, _, rows in results for row in rows]
    manifest = {
        "format": plan.fmt,
        "created_by": "rayssl.data.shards",
        "source": re.sub(r"//[^/@]*@", "//", plan.source),  # no userinfo from a URL
        "num_samples": sum(n for _, n, _ in results),
        "shard_size": plan.shard_size,
        "shards": [{"name": name, "samples": n} for name, n, _ in results],
    }
    if plan.source == "scenes":
        manifest["scenes"] = {"seed": plan.seed, "size": plan.scene_size, "stream": "train", "classes": list(SHAPES)}
    with translate_errors(out, s3.signed(), "write to", what="--out"):
        if labelled:  # a labels table beside the shards: rayssl eval --data OUT finds it through the manifest
            manifest["labels"] = labels_name(plan.prefix)
            with atomic_open(plan.out_fs, f"{plan.out_path}/{manifest['labels']}") as f:
                f.write(labels_csv(labelled))
        with atomic_open(plan.out_fs, f"{plan.out_path}/{MANIFEST_NAME}") as f:
            f.write(json.dumps(manifest, indent=2).encode("utf-8"))
    return manifest


def write_shards(source: str, out: str, fmt: str = "webdataset", shard_size: int = 1000, **options) -> dict:
    """``plan_shards`` then ``write_planned`` (on the connected Ray); ``options`` as ``plan_shards``."""
    return write_planned(plan_shards(source, out, fmt, shard_size, **options))
