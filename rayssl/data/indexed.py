"""Training rows that keep each image's index, for methods with per-image state (CDUL).

``build_indexed_train_data(data, seed, table_uri)`` reads the index (and path) of every
pseudo-labelled image from the labelling job's Parquet and streams
``{"index", "crop_0".."crop_{n-1}"}`` rows: generated scenes are re-generated from their
number; image files, or the members of tar shards by their byte range, are fetched, decoded
and cropped like ``rayssl.data.pipeline`` does (bad files skipped and counted in the same
``DataCounts``). The index is what the label store is keyed by, so rows may arrive in any
order on any worker.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import ray

from rayssl.data.decode import decode_batch
from rayssl.data.multicrop import crop_spec, multicrop_batch
from rayssl.data.pipeline import TrainData, data_listing, epoch_block_order, min_image_side
from rayssl.data.pseudo_labels import read_meta, read_pseudo_labels
from rayssl.data.scenes import generate_batch
from rayssl.data.sources import DataError, Source
from rayssl.data.stats import DataCounts, augment_generators, report
from rayssl.sections import DataSection
from rayssl.storage.retrying import fetch_objects

__all__ = ["build_indexed_train_data", "byte_ranges", "fetch_decode_count"]


def indexed_scenes_to_crops(batch: dict, *, seed: int, size: int, spec, stats=None) -> dict:
    idx = np.asarray(batch["index"], dtype=np.int64)
    scenes = generate_batch(idx, seed=seed, size=size)
    report(stats, Counter(seen=len(idx)))
    # Seeded per image by (seed, epoch, index), as the other pipelines: a resume sees the same crops.
    return {"index": idx, **multicrop_batch(list(scenes["image"]), spec, augment_generators(seed, stats, idx.tolist()))}


def byte_ranges(batch: dict) -> tuple[list[int] | None, list[int] | None]:
    """(starts, ends) of rows addressed inside a shard (``offset``, ``length``), else (None, None)."""
    if "offset" not in batch:
        return None, None
    starts = np.asarray(batch["offset"], dtype=np.int64)
    return starts.tolist(), (starts + np.asarray(batch["length"], dtype=np.int64)).tolist()


def fetch_decode_count(paths: list[str], *, fs, min_side: int, stats=None, max_bad_fraction: float = 1.0,
                       uri: str = "", starts: list[int] | None = None,
                       ends: list[int] | None = None) -> list[tuple[int, np.ndarray]]:
    """Fetch (one concurrent request per batch) and decode images -> ``[(row, rgb uint8)]`` of
    those that are usable; the others are counted in ``stats`` by reason (``read_error``,
    ``storage_error``, ``decode_error``, ``empty``, ``too_small`` ...), retries as ``retried``,
    as ``rayssl.data.pipeline`` counts them.
    Whole files, or with ``starts``/``ends`` the byte range of each (a tar shard's member)."""
    blobs, counts = fetch_objects(fs, paths, starts, ends)
    keep = [i for i, b in enumerate(blobs) if b is not None]
    counts["seen"] += len(blobs)
    images, skipped, converted = decode_batch([blobs[i] for i in keep], min_side=min_side)
    counts.update({f"skipped.{getattr(k, 'value', k)}": v for k, v in skipped.items()})
    counts.update({f"converted.{k}": v for k, v in converted.items()})
    report(stats, Counter({k: v for k, v in counts.items() if v}), max_bad_fraction, uri)
    return [(keep[j], im) for j, im in enumerate(images) if im is not None]


def indexed_files_to_crops(batch: dict, *, fs, spec, min_side: int, stats=None, max_bad_fraction: float = 1.0,
                           uri: str = "", seed: int = 0) -> dict:
    starts, ends = byte_ranges(batch)
    good = fetch_decode_count([str(p) for p in batch["path"]], fs=fs, min_side=min_side, stats=stats,
                              max_bad_fraction=max_bad_fraction, uri=uri, starts=starts, ends=ends)
    if not good:
        return {}
    idx = np.asarray(batch["index"], dtype=np.int64)[[r for r, _ in good]]
    return {"index": idx, **multicrop_batch([im for _, im in good], spec, augment_generators(seed, stats, idx.tolist()))}


def build_indexed_train_data(d: DataSection, seed: int, pseudo_labels: str,
                             stats: DataCounts | None = None, source: Source | None = None) -> TrainData:
    """The images ``pseudo_labels`` (a labelling job's output) lists, each row with its index.
    ``source``: ``d.source`` resolved, where the caller has it (a bucket's listing can take minutes;
    the rows come from the table, and the source gives the filesystem they are read through)."""
    options = d.s3.signed()  # the run's own label table
    meta = read_meta(pseudo_labels, options)
    src = meta["source"]
    # Images inside tar shards are addressed by their byte range in the shard file.
    ranged = src["kind"] == "webdataset"
    _, cols = read_pseudo_labels(pseudo_labels, columns=("index", "path") + (("offset", "length") if ranged else ()),
                                 options=options)
    spec = crop_spec(d)
    stats = stats if stats is not None else DataCounts()
    index = cols["index"].astype(np.int64)
    rng = np.random.default_rng(seed)
    # Shuffled from index order, not from the order the labelling job happened to write its
    # rows in: the same images and seed give the same training stream whichever job labelled them.
    order = np.argsort(index, kind="stable")[rng.permutation(len(index))]
    if src["kind"] == "scenes":
        if not d.builtin_scenes:
            raise DataError(f"--pseudo-labels: {pseudo_labels} labels generated scenes, but --data is {d.source}")
        table = pa.table({"index": pa.array(index[order])})
        fn, kwargs = indexed_scenes_to_crops, {"seed": int(src["seed"]), "size": d.scenes_image_size}
    else:
        if d.builtin_scenes or d.source.rstrip("/") != str(src["uri"]).rstrip("/"):
            raise DataError(f"--pseudo-labels: {pseudo_labels} labels {src['uri']}, but --data is {d.source}")
        source = data_listing(d, source)
        paths = np.asarray(cols["path"], dtype=object)
        table = pa.table({"index": pa.array(index[order]), "path": pa.array(list(paths[order]), pa.string()),
                          **({k: pa.array(cols[k].astype(np.int64)[order]) for k in ("offset", "length")}
                             if ranged else {})})
        fn = indexed_files_to_crops
        kwargs = {"fs": source.fs, "min_side": min_image_side(d), "uri": source.uri,
                  "max_bad_fraction": float(d.max_bad_fraction), "seed": seed}
    step = max(1, d.read_batch_size * max(1, -(-len(index) // (2000 * d.read_batch_size))))
    blocks = [table.slice(i, step) for i in range(0, len(index), step)]
    ds = epoch_block_order(d, ray.data.from_arrow(blocks)).map_batches(
        fn, batch_size=d.read_batch_size, fn_kwargs={"spec": spec, "stats": stats, **kwargs})
    return TrainData(ds, len(index), stats)
