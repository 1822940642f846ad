"""The Ray Data pipeline: a source of images -> decoded RGB -> multi-crop uint8 batches.

Sources (see ``rayssl.data.sources``): the built-in scenes, image files in a folder or
an S3 prefix, WebDataset ``.tar`` shards, Parquet shards with an image-bytes column.

Rows leaving the pipeline hold only ``crop_0 .. crop_{n-1}`` (uint8, (s, s, 3)): pixels are
shipped compressed-small as uint8 and normalised on the training worker's device.
Decoding happens once per sample, inside the same map task that reads and crops it, so
no encoded or decoded full-size image is ever stored in the object store. The pipeline
streams: a tar shard is read sequentially inside one task and emits crops as it goes;
image files are fetched a batch at a time (concurrent GETs on S3); nothing is
materialised, so a long run over a large bucket keeps bounded memory.

Images that cannot be used are dropped and counted in a ``DataStats`` actor (keys
``seen``, ``skipped.<reason>``, ``converted.<conversion>``); the driver puts the counts in
the run summary and the training loop shows them in its progress. Reasons: the decode
ones (``decode_error``, ``empty``, ``too_small``, ``too_large``) plus ``read_error`` (a
file that could not be fetched) and ``unreadable_shard`` (a corrupt or truncated shard:
counted once per shard, its readable members before the damage are still used).
When more than ``data.max_bad_fraction`` of the images seen so far are skipped (checked
once ``MIN_SEEN_FOR_BAD_CHECK`` images were seen), the pipeline raises a DataError naming
the counts, which stops training: a bucket of mostly broken files is a mistake to fix,
not something to train on.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray

from rayssl.data.multicrop import MultiCropSpec, multicrop_batch
from rayssl.data.scenes import generate_batch, split_seed
from rayssl.data.sources import (
    IMAGE_EXTENSIONS,
    DataError,
    Source,
    count_samples,
    iter_tar_images,
    open_shard,
    resolve_source,
)
from rayssl.storage import S3Options

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_SEEN_FOR_BAD_CHECK",
    "DataError",
    "DataStats",
    "TrainData",
    "build_train_data",
    "crop_spec",
    "data_error_message",
    "min_image_side",
]

# The bad-data check waits for this many images, so a few broken files at the start of
# a stream cannot stop a run.
MIN_SEEN_FOR_BAD_CHECK = 64

# Counts that are not images (a shard is one unit) and so stay out of the bad fraction.
_NOT_IMAGE_COUNTS = ("skipped.unreadable_shard",)


@ray.remote(num_cpus=0)
class DataStats:
    """Counts of images seen, skipped (by reason) and converted, summed over all tasks."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, counts: dict) -> dict:
        self.counts.update(counts)
        return dict(self.counts)

    def get(self) -> dict:
        return dict(self.counts)


def crop_spec(cfg) -> MultiCropSpec:
    d = cfg.data
    return MultiCropSpec(sizes=tuple(d.crop_sizes), counts=tuple(d.crop_counts),
                         min_scale=tuple(d.min_scale), max_scale=tuple(d.max_scale),
                         jitter=d.color_jitter, jitter_p=d.color_jitter_p,
                         grayscale_p=d.grayscale_p, blur_p=d.blur_p)


def min_image_side(cfg) -> int:
    """Shorter side below which an image is skipped as too_small: ``data.min_image_side``,
    or (0, the default) the largest crop size -- smaller images would only be upsampled."""
    d = cfg.data
    return int(getattr(d, "min_image_side", 0) or max(d.crop_sizes))


def bad_fraction_error(totals: dict, max_bad_fraction: float, uri: str = "") -> str | None:
    """The error message when too many of the images seen so far were skipped, else None."""
    seen = int(totals.get("seen", 0))
    skips = {k: v for k, v in totals.items() if k.startswith("skipped.") and k not in _NOT_IMAGE_COUNTS}
    bad = sum(skips.values())
    if seen < MIN_SEEN_FOR_BAD_CHECK or bad <= max_bad_fraction * seen:
        return None
    why = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(skips.items()))
    where = f" in {uri}" if uri else ""
    hint = "check the data (or raise data.max_bad_fraction)"
    if max(skips, key=skips.get) == "skipped.too_small":
        hint = ("most images are smaller than data.min_image_side (0: the largest of data.crop_sizes); "
                "use smaller crops or set data.min_image_side")
    return (f"{bad} of {seen} images{where} were unusable ({why}): more than data.max_bad_fraction="
            f"{max_bad_fraction:g}; {hint}")


_DATA_ERROR_LINE = re.compile(r"DataError: ([^\n]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def data_error_message(exc: BaseException) -> str | None:
    """The DataError message inside a (Ray-wrapped) failure, or None.

    A DataError raised in a Ray Data task reaches the driver only as text inside
    ``RayTaskError(UserCodeException)`` (and, through Ray Train, inside a
    ``WorkerGroupError``'s worker failures): the original class is not chained, so the
    message is found in the text. For the driver's one-line "training failed" report.
    """
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError) and type(e) is DataError:
            return str(e).strip().splitlines()[0]
        m = _DATA_ERROR_LINE.search(_ANSI.sub("", str(e)))
        if m:
            return m.group(1).strip()
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures.values())
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


def _report(stats, counts: Counter, max_bad_fraction: float = 1.0, uri: str = "") -> None:
    """Send this batch's counts to the stats actor.

    Fire and forget when nothing was skipped (never block the data path for the common
    case); when something was, wait for the totals and stop the run if too much is bad.
    """
    if stats is None or not counts:
        return
    bad = any(k.startswith("skipped.") for k in counts)
    if not bad or max_bad_fraction >= 1.0:
        stats.add.remote(dict(counts))
        return
    totals = ray.get(stats.add.remote(dict(counts)))
    msg = bad_fraction_error(totals, max_bad_fraction, uri)
    if msg:
        raise DataError(msg)


def _decode_crop_count(blobs: list, *, spec: MultiCropSpec, min_side: int, stats, extra: Counter | None = None,
                       max_bad_fraction: float = 1.0, uri: str = "") -> dict:
    """Encoded images (``None`` = could not be read) -> crops; counts reported to ``stats``."""
    from rayssl.data.decode import decode_batch

    counts = Counter(extra or {})
    readable = [b for b in blobs if b is not None]
    counts["seen"] += len(blobs)
    if len(readable) < len(blobs):
        counts["skipped.read_error"] += len(blobs) - len(readable)
    images, skipped, converted = decode_batch(readable, min_side=min_side)
    counts.update({f"skipped.{getattr(k, 'value', k)}": v for k, v in skipped.items()})
    counts.update({f"converted.{k}": v for k, v in converted.items()})
    counts = Counter({k: v for k, v in counts.items() if v})
    _report(stats, counts, max_bad_fraction, uri)
    good = [im for im in images if im is not None]
    if not good:
        # No columns at all: Ray Data drops the empty batch (a zero-length tensor column
        # would fall back to pickled objects and mix two block formats).
        return {}
    return multicrop_batch(good, spec, np.random.default_rng())  # fresh entropy: new crops every epoch


# ---------------------------------------------------------------- map_batches functions


def crop_scenes(batch: dict, *, seed: int, size: int, spec: MultiCropSpec, stats=None) -> dict:
    """``{"id": (N,)}`` from ``ray.data.range`` -> generated scenes -> crops."""
    scenes = generate_batch(np.asarray(batch["id"]), seed=seed, size=size)
    rng = np.random.default_rng()  # fresh entropy: every epoch sees new crops
    _report(stats, Counter(seen=len(scenes["image"])))
    return multicrop_batch(list(scenes["image"]), spec, rng)


def _blob(value):
    """A cell of an image column -> bytes (binary, or a struct with a 'bytes' field)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return b""
    return bytes(value)


def decode_and_crop(batch: dict, *, spec: MultiCropSpec, min_side: int, stats=None, column: str = "bytes",
                    max_bad_fraction: float = 1.0, uri: str = "") -> dict:
    """``{column: (N,)}`` encoded images (files' bytes, a Parquet image column) -> crops."""
    blobs = [_blob(v) for v in batch[column]]
    return _decode_crop_count(blobs, spec=spec, min_side=min_side, stats=stats,
                              max_bad_fraction=max_bad_fraction, uri=uri)


def fetch_decode_and_crop(batch: dict, *, fs, spec: MultiCropSpec, min_side: int, stats=None,
                          max_bad_fraction: float = 1.0, uri: str = "") -> dict:
    """``{"path": (N,)}`` image files -> bytes (one concurrent fetch per batch) -> crops.

    A file that cannot be fetched (deleted since the listing, no permission on one key)
    is skipped as ``read_error`` rather than failing the run.
    """
    paths = [str(p) for p in batch["path"]]
    fetched = fs.cat_ranges(paths, None, None, on_error="return")
    blobs = [None if isinstance(b, BaseException) else bytes(b) for b in fetched]
    return _decode_crop_count(blobs, spec=spec, min_side=min_side, stats=stats,
                              max_bad_fraction=max_bad_fraction, uri=uri)


def tar_shards_to_crops(batch: dict, *, fs, spec: MultiCropSpec, min_side: int, chunk: int, stats=None,
                        max_bad_fraction: float = 1.0, uri: str = ""):
    """``{"path": (N,)}`` tar shards -> crop batches of up to ``chunk`` images, streamed.

    A generator: each shard is read sequentially and its images are decoded and cropped
    ``chunk`` at a time, so memory holds one chunk, not one shard. A corrupt or truncated
    shard is counted once as ``unreadable_shard``; its members before the damage are used.
    """
    for path in batch["path"]:
        pending: list[bytes] = []
        broken = Counter()
        try:
            with open_shard(fs, str(path)) as f:
                for _key, data in iter_tar_images(f):
                    pending.append(data)
                    if len(pending) >= chunk:
                        out = _decode_crop_count(pending, spec=spec, min_side=min_side, stats=stats,
                                                 max_bad_fraction=max_bad_fraction, uri=uri)
                        pending = []
                        if out:
                            yield out
        except DataError:
            raise
        except Exception:  # noqa: BLE001 - tarfile.ReadError, EOFError, OSError, zlib errors...
            broken["skipped.unreadable_shard"] = 1
        if pending or broken:
            out = _decode_crop_count(pending, spec=spec, min_side=min_side, stats=stats, extra=broken,
                                     max_bad_fraction=max_bad_fraction, uri=uri)
            if out:
                yield out


# ---------------------------------------------------------------- building the dataset


def resolve_cfg_source(cfg) -> Source:
    """``cfg.data.source`` resolved (listed once); DataError names the URI on failure."""
    d = cfg.data
    return resolve_source(d.source, S3Options.from_config(cfg), image_column=getattr(d, "parquet_image_column", "image"))


@dataclass
class TrainData:
    dataset: "ray.data.Dataset"
    num_images: int  # images listed (before any skips): sizes the LR schedule
    stats: object  # DataStats actor handle
    source: Source | None = None  # None for the built-in scenes


def _path_blocks(paths: list[str], rows_per_block: int) -> "ray.data.Dataset":
    """A dataset of ``{"path"}`` rows in several blocks (Ray Data parallelises per block)."""
    import pyarrow as pa

    table = pa.table({"path": pa.array(paths, pa.string())})
    step = max(1, rows_per_block)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(paths), step)])


def build_train_data(cfg, stats=None, source: Source | None = None) -> TrainData:
    """The training dataset for ``cfg.data.source`` (any kind of source; see the module doc)."""
    spec = crop_spec(cfg)
    d = cfg.data
    stats = stats if stats is not None else DataStats.remote()
    if d.builtin_scenes:
        n = d.scenes_num_images
        blocks = max(1, min(64, n // max(1, d.read_batch_size)))
        ds = ray.data.range(n, override_num_blocks=blocks).map_batches(
            crop_scenes,
            batch_size=d.read_batch_size,
            fn_kwargs={"seed": split_seed(cfg.run.seed, "train"), "size": d.scenes_image_size,
                       "spec": spec, "stats": stats},
        )
        return TrainData(ds, n, stats)

    source = source or resolve_cfg_source(cfg)
    common = {"spec": spec, "min_side": min_image_side(cfg), "stats": stats,
              "max_bad_fraction": float(getattr(d, "max_bad_fraction", 1.0)), "uri": source.uri}
    # Visit files/shards in a seeded random order (sorted listings put whole classes
    # together), and the blocks in a new order every epoch.
    rng = np.random.default_rng(cfg.run.seed)
    paths = [source.paths[i] for i in rng.permutation(len(source.paths))]
    if source.kind == "images":
        # Blocks of whole read batches, at most ~2000 of them however large the listing
        # (one task streams through a block a read batch at a time).
        per_block = d.read_batch_size * max(1, -(-len(paths) // (2000 * d.read_batch_size)))
        ds = _path_blocks(paths, per_block).randomize_block_order().map_batches(
            fetch_decode_and_crop, batch_size=d.read_batch_size, fn_kwargs={"fs": source.fs, **common},
        )
        return TrainData(ds, len(paths), stats, source)
    if source.kind == "webdataset":
        ds = _path_blocks(paths, 1).randomize_block_order().map_batches(
            tar_shards_to_crops, batch_size=1,
            fn_kwargs={"fs": source.fs, "chunk": d.read_batch_size, **common},
        )
        return TrainData(ds, count_samples(source), stats, source)
    if source.kind == "parquet":
        ds = ray.data.read_parquet(
            paths, filesystem=source.pyarrow_fs, shuffle="files",
        ).select_columns([source.image_column]).map_batches(  # only the image column is read
            decode_and_crop, batch_size=d.read_batch_size, fn_kwargs={"column": source.image_column, **common})
        return TrainData(ds, count_samples(source), stats, source)
    raise DataError(f"data source {source.uri}: unsupported kind {source.kind!r}")  # pragma: no cover
