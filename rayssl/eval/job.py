"""Frozen-feature extraction as a Ray Data batch-inference job (the Ray part of ``rayssl.eval``).

Read tasks produce ``{"id", "image"}`` rows (images decoded, centre-cropped and resized to
the backbone's training size; unreadable ones dropped and counted), and a pool of actors,
each holding the backbone once (on a GPU when the cluster has them), turns batches into
``{"id", "feature"}`` rows. Columns other than ``image`` (the built-in scenes' labels) pass
through the actors untouched. The pure parts (preprocessing, metrics) live in
``rayssl.eval.preprocess`` and the metric modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import ray

from rayssl.data.decode import decode_image
from rayssl.data.labels import image_id
from rayssl.data.pipeline import image_bytes
from rayssl.data.scenes import generate_batch, split_seed
from rayssl.data.sources import Source
from rayssl.data.tar import iter_tar_images, open_shard
from rayssl.eval.features import extract_features
from rayssl.eval.preprocess import center_square
from rayssl.modules.backbone import build_backbone
from rayssl.storage.retrying import fetch_objects


# ------------------------------------------------------------------ read functions (map_batches)


def _decoded(ids, blobs, size: int) -> dict:
    out_ids, images = [], []
    for i, blob in zip(ids, blobs):
        img, _reason, _ = decode_image(blob) if blob else (None, "empty", None)
        if img is not None:
            out_ids.append(str(i))
            images.append(center_square(img, size))
    return {"id": np.asarray(out_ids, dtype=object),
            "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)}


def read_files(batch: dict, *, fs, size: int) -> dict:
    """``{"id", "path"}`` image files -> ``{"id", "image"}`` (one concurrent fetch per batch)."""
    blobs, _ = fetch_objects(fs, [str(p) for p in batch["path"]])  # retried; the unreadable are skipped
    return _decoded(batch["id"], [b or b"" for b in blobs], size)


def read_tar_shards(batch: dict, *, fs, size: int, chunk: int = 64):
    """``{"path"}`` WebDataset shards -> ``{"id", "image"}`` batches, streamed; id = sample key."""
    for path in batch["path"]:
        keys, blobs = [], []
        try:
            with open_shard(fs, str(path)) as f:
                for key, data in iter_tar_images(f):
                    keys.append(key)
                    blobs.append(data)
                    if len(keys) >= chunk:
                        yield _decoded(keys, blobs, size)
                        keys, blobs = [], []
        except Exception:  # noqa: BLE001 - a damaged shard: keep what came before the damage
            pass
        if keys:
            yield _decoded(keys, blobs, size)


def read_parquet_rows(batch: dict, *, id_column: str, image_column: str, size: int) -> dict:
    ids = [image_id(v) for v in batch[id_column]]
    return _decoded(ids, [image_bytes(v) for v in batch[image_column]], size)


def read_scenes(batch: dict, *, seed: int, n_train: int, scene_size: int, size: int) -> dict:
    """``ray.data.range`` ids -> labelled held-out scenes: ids < n_train from the eval-train
    stream, the rest from the eval-test stream (both disjoint from the training scenes)."""
    idx = np.asarray(batch["id"], dtype=np.int64)
    parts = []
    for split, sel, offset in (("eval-train", idx < n_train, 0), ("eval-test", idx >= n_train, n_train)):
        if sel.any():
            parts.append((split, generate_batch(idx[sel] - offset, seed=split_seed(seed, split), size=scene_size)))
    images = np.concatenate([p["image"] for _, p in parts])
    if images.shape[1] != size:
        images = np.stack([center_square(im, size) for im in images])
    return {
        "id": np.concatenate([p["key"] for _, p in parts]).astype(object),
        "split": np.asarray([s for s, p in parts for _ in range(len(p["key"]))], dtype=object),
        "image": images,
        "label": np.concatenate([p["label"] for _, p in parts]),
        "labels": np.concatenate([p["labels"] for _, p in parts]),
    }


# ------------------------------------------------------------------ the inference actor


class BackboneFeatures:
    """Ray Data actor: holds the frozen backbone once; ``{"image", ...}`` -> ``{"feature", ...}``."""

    def __init__(self, arch: str, small_stem: bool, state_ref, size: int, threads: int = 1, device: str | None = None):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        state = ray.get(state_ref[0]) if isinstance(state_ref, list) else state_ref
        self.net, _ = build_backbone(arch, small_stem=small_stem)
        self.net.load_state_dict(state, strict=True)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.net.to(self.device).eval()
        self.size = size

    def __call__(self, batch: dict) -> dict:
        images = np.asarray(batch.pop("image"))
        feats = extract_features(self.net, images, self.size, self.device, batch_size=max(1, len(images)))
        batch["feature"] = feats.numpy()
        return batch


# ------------------------------------------------------------------ the job


@dataclass(frozen=True)
class ActorPool:
    """The inference actors of the job: how many, on GPUs or not, and the CPUs each reserves
    (the command sizes it with ``rayssl.runtime.cluster.place``)."""

    actors: int = 1
    use_gpu: bool = False
    cpus: float = 1.0


@dataclass
class FeatureTable:
    ids: list[str]
    features: np.ndarray  # (N, d) float32
    columns: dict = field(default_factory=dict)  # pass-through columns, row-aligned
    skipped: int = 0  # listed images that could not be read or decoded


def collect(batches: Iterable[dict], expected: int | None) -> FeatureTable:
    """``{"id", "feature", ...}`` batches -> one table; ``expected``: the images listed (None when
    only the reading knows, as in shards), so the unreadable ones are counted."""
    ids, feats, cols = [], [], {}
    for b in batches:
        ids.extend(str(i) for i in b["id"])
        feats.append(np.asarray(b["feature"], dtype=np.float32))
        for k, v in b.items():
            if k not in ("id", "feature"):
                cols.setdefault(k, []).append(np.asarray(v))
    features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    columns = {k: np.concatenate(v) for k, v in cols.items()}
    skipped = max(0, expected - len(ids)) if expected is not None else 0
    return FeatureTable(ids, features, columns, skipped)


def _collect(ds, expected: int | None) -> FeatureTable:
    return collect(ds.iter_batches(batch_size=1024, batch_format="numpy"), expected)


def _infer(ds, arch: str, small_stem: bool, state: dict, size: int, pool: ActorPool, batch_size: int):
    return ds.map_batches(
        BackboneFeatures,
        fn_constructor_kwargs={"arch": arch, "small_stem": small_stem, "state_ref": [ray.put(state)],
                               "size": size, "threads": max(1, int(pool.cpus))},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_gpus=1 if pool.use_gpu else 0,
        num_cpus=pool.cpus,
    )


def scene_features(arch: str, small_stem: bool, state: dict, *, seed: int, n_train: int, n_test: int,
                   scene_size: int, size: int, pool: ActorPool = ActorPool(),
                   batch_size: int) -> FeatureTable:
    n = n_train + n_test
    ds = ray.data.range(n, override_num_blocks=max(1, min(16, n // 256))).map_batches(
        read_scenes, batch_size=128,
        fn_kwargs={"seed": seed, "n_train": n_train, "scene_size": scene_size, "size": size})
    return _collect(_infer(ds, arch, small_stem, state, size, pool, batch_size), n)


def source_features(source: Source, ids_by_path: dict[str, str] | None, arch: str, small_stem: bool,
                    state: dict, *, size: int, batch_size: int, pool: ActorPool = ActorPool(),
                    parquet_id_column: str | None = None) -> FeatureTable:
    """Features of every readable image of ``source`` (files, tar or Parquet shards)."""
    import pyarrow as pa

    if source.kind == "images":
        paths = list(ids_by_path)
        table = pa.table({"id": [ids_by_path[p] for p in paths], "path": paths})
        step = 64
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(paths), step)]).map_batches(
            read_files, batch_size=64, fn_kwargs={"fs": source.fs, "size": size})
    elif source.kind == "webdataset":
        table = pa.table({"path": source.paths})
        ds = ray.data.from_arrow([table.slice(i, 1) for i in range(len(source.paths))]).map_batches(
            read_tar_shards, batch_size=1, fn_kwargs={"fs": source.fs, "size": size})
    else:  # parquet
        if not parquet_id_column:
            raise ValueError(f"--data {source.uri}: Parquet shards need an id column to match labels")
        ds = ray.data.read_parquet(source.paths, filesystem=source.pyarrow_fs).select_columns(
            [parquet_id_column, source.image_column]).map_batches(
            read_parquet_rows, batch_size=64,
            fn_kwargs={"id_column": parquet_id_column, "image_column": source.image_column, "size": size})
    return _collect(_infer(ds, arch, small_stem, state, size, pool, batch_size), listed_images(source, ids_by_path))


def read_source(source: Source, ids_by_path: dict[str, str] | None, *, size: int,
                parquet_id_column: str | None = None, chunk: int = 64) -> Iterator[dict]:
    """The ``{"id", "image"}`` batches ``source_features``' read tasks produce, read in this
    process, ``chunk`` images at a time (a training run's own evaluation,
    ``rayssl.runtime.evaluation``): the same read functions, so the same images and pixels."""
    if source.kind == "images":
        paths = list(ids_by_path)
        for i in range(0, len(paths), chunk):
            part = paths[i:i + chunk]
            yield read_files({"id": [ids_by_path[p] for p in part], "path": part}, fs=source.fs, size=size)
    elif source.kind == "webdataset":
        for path in source.paths:
            yield from read_tar_shards({"path": [path]}, fs=source.fs, size=size, chunk=chunk)
    else:  # parquet
        import pyarrow.parquet as pq

        for path in source.paths:
            with source.fs.open(path, "rb") as f:
                for rows in pq.ParquetFile(f).iter_batches(batch_size=chunk,
                                                           columns=[parquet_id_column, source.image_column]):
                    yield read_parquet_rows(rows.to_pydict(), id_column=parquet_id_column,
                                            image_column=source.image_column, size=size)


def listed_images(source: Source, ids_by_path: dict[str, str] | None) -> int | None:
    """How many images ``source`` lists for evaluation (None for shards: only reading them tells)."""
    return len(ids_by_path) if source.kind == "images" else None
