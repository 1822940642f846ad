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

Images that cannot be used are dropped and counted in the run's ``DataCounts`` (``rayssl.data.stats``; keys
``seen``, ``skipped.<reason>``, ``converted.<conversion>``); the driver puts the counts in
the run summary and the training loop shows them in its progress. Reasons: the decode
ones (``decode_error``, ``empty``, ``too_small``, ``too_large``) plus ``read_error`` (a
file that could not be fetched) and ``unreadable_shard`` (a corrupt or truncated shard:
counted once per shard, its readable members before the damage are still used).
When more than ``data.max_bad_fraction`` of the images seen so far are skipped (checked
once ``MIN_SEEN_FOR_BAD_CHECK`` images were seen), the pipeline raises a DataError naming
the counts, which stops training: a bucket of mostly broken files is a mistake to fix,
not something to train on.

Augmentations are seeded per sample by (run seed, epoch, a stable key of the sample: the
scene index, the file path, shard path + member key, or for Parquet rows a hash of the
image bytes); the consumer announces each epoch with ``DataCounts.set_epoch`` before reading
it. Row order is Ray Data's streaming order unless ``data.deterministic`` is set: then the
file/shard order is the seeded one every epoch, and the trainer runs the shards with
``preserve_order`` so that every worker gets the same rows in the same order on every run
(what makes a resumed run match an uninterrupted one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray

from rayssl.data.decode import decode_batch
from rayssl.data.multicrop import MultiCropSpec, crop_spec, multicrop_batch, sample_generators, stable_key
from rayssl.data.scenes import epoch_order, generate_batch, split_seed
from rayssl.data.ship import ShipToDevice, check_encoded
from rayssl.data.sources import DataError, Source, count_samples, resolve_source
from rayssl.data.stats import DataCounts, current_epoch, report
from rayssl.data.tar import iter_tar_images, open_shard
from rayssl.sections import DataSection
from rayssl.storage.retrying import fetch_objects, transient

__all__ = ["TrainData", "build_train_data", "epoch_block_order", "image_bytes", "min_image_side",
           "data_listing", "resolve_data_source", "shard_images"]

def epoch_block_order(data: DataSection, ds):
    """``ds`` with its blocks in a new random order every epoch; in ``data.deterministic``
    mode, unchanged (the seeded order the caller built), so that ``streaming_split`` hands
    every worker the same rows each run and a resumed run matches an uninterrupted one."""
    return ds if data.deterministic else ds.randomize_block_order()


def min_image_side(data: DataSection) -> int:
    """Shorter side below which an image is skipped as too_small: ``data.min_image_side``,
    or (0, the default) the largest crop size -- smaller images would only be upsampled."""
    return int(data.min_image_side or max(data.crop_sizes))


def decode_crop_count(blobs: list, keys: list[int], *, spec: MultiCropSpec, min_side: int, stats,
                      seed: int = 0, extra: Counter | None = None, max_bad_fraction: float = 1.0,
                      uri: str = "", epoch: int | None = None) -> dict:
    """Encoded images and their stable keys -> crops; counts reported to ``stats``. ``None`` is an
    image that could not be fetched: seen, and skipped for the reason the fetch counted in
    ``extra`` (``rayssl.storage.retrying.fetch_objects``). ``epoch``: the epoch if the caller
    already read it."""
    if isinstance(spec, ShipToDevice):  # data.augment_on=device: the training worker decodes and crops
        return _ship_encoded(blobs, keys, min_side=min_side, stats=stats, extra=extra,
                             max_bad_fraction=max_bad_fraction, uri=uri)
    counts = Counter(extra or {})
    readable = [b for b in blobs if b is not None]
    keys = [k for k, b in zip(keys, blobs) if b is not None]
    counts["seen"] += len(blobs)
    images, skipped, converted = decode_batch(readable, min_side=min_side)
    counts.update({f"skipped.{getattr(k, 'value', k)}": v for k, v in skipped.items()})
    counts.update({f"converted.{k}": v for k, v in converted.items()})
    counts = Counter({k: v for k, v in counts.items() if v})
    report(stats, counts, max_bad_fraction, uri)
    good = [(im, k) for im, k in zip(images, keys) if im is not None]
    if not good:
        # No columns at all: Ray Data drops the empty batch (a zero-length tensor column
        # would fall back to pickled objects and mix two block formats).
        return {}
    epoch = current_epoch(stats) if epoch is None else epoch
    return multicrop_batch([im for im, _ in good], spec, sample_generators(seed, epoch, [k for _, k in good]))


def _ship_encoded(blobs: list, keys: list[int], *, min_side: int, stats, extra: Counter | None = None,
                  max_bad_fraction: float = 1.0, uri: str = "") -> dict:
    """``augment_on=device``: header-checked encoded images -> ``{"encoded", "key"}`` rows
    (nothing decoded here); skips counted as on the CPU path."""
    counts = Counter(extra or {})
    counts["seen"] += len(blobs)
    readable = [(b, k) for b, k in zip(blobs, keys) if b is not None]
    good, skipped = check_encoded([b for b, _ in readable], min_side=min_side)
    counts.update({f"skipped.{k}": v for k, v in skipped.items()})
    report(stats, Counter({k: v for k, v in counts.items() if v}), max_bad_fraction, uri)
    if not good:
        return {}
    encoded = np.empty(len(good), dtype=object)
    encoded[:] = [readable[i][0] for i in good]
    return {"encoded": encoded, "key": np.array([readable[i][1] for i in good], dtype=np.uint64)}


# ---------------------------------------------------------------- map_batches functions


def crop_scenes(batch: dict, *, seed: int, size: int, spec: MultiCropSpec, stats=None, num_images: int = 0) -> dict:
    """``{"id": (N,)}`` from ``ray.data.range`` -> generated scenes -> crops (the scene
    index is the sample's augmentation key).

    ``num_images``: row ``i`` of epoch ``e`` is scene ``epoch_order(num_images, seed, e)[i]``, so
    every epoch visits all the scenes in a new global order and no shuffle buffer is needed
    (``TrainData.shuffled_at_source``); 0 keeps scene ``i`` at row ``i``."""
    epoch = current_epoch(stats)
    ids = np.asarray(batch["id"])
    if num_images:
        ids = epoch_order(num_images, seed, epoch)[ids]
    scenes = generate_batch(ids, seed=seed, size=size)
    report(stats, Counter(seen=len(scenes["image"])))
    if isinstance(spec, ShipToDevice):  # the worker crops the uint8 scenes on its device
        return {"image": scenes["image"], "key": ids.astype(np.uint64)}
    return multicrop_batch(list(scenes["image"]), spec, sample_generators(seed, epoch, ids.tolist()))


def image_bytes(value) -> bytes:
    """A cell of an image column -> bytes (binary, or a struct with a 'bytes' field)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return b""
    return bytes(value)


def decode_and_crop(batch: dict, *, spec: MultiCropSpec, min_side: int, stats=None, column: str = "bytes",
                    seed: int = 0, max_bad_fraction: float = 1.0, uri: str = "") -> dict:
    """``{column: (N,)}`` encoded images (files' bytes, a Parquet image column) -> crops.

    Rows carry no name, so an image's augmentation key is a hash of its bytes."""
    blobs = [image_bytes(v) for v in batch[column]]
    return decode_crop_count(blobs, [stable_key(b) for b in blobs], spec=spec, min_side=min_side, stats=stats,
                              seed=seed, max_bad_fraction=max_bad_fraction, uri=uri)


def fetch_decode_and_crop(batch: dict, *, fs, spec: MultiCropSpec, min_side: int, stats=None, seed: int = 0,
                          max_bad_fraction: float = 1.0, uri: str = "") -> dict:
    """``{"path": (N,)}`` image files -> bytes (one concurrent fetch per batch) -> crops.

    A file that cannot be fetched is skipped, not fatal: ``read_error`` when the object itself
    is gone or forbidden (deleted since the listing), ``storage_error`` when the store still
    failed after the retries; the retries are counted (``retried``).
    """
    paths = [str(p) for p in batch["path"]]
    blobs, fetch_counts = fetch_objects(fs, paths)  # None where the fetch failed, counted by reason
    return decode_crop_count(blobs, [stable_key(p) for p in paths], spec=spec, min_side=min_side, stats=stats,
                             seed=seed, extra=fetch_counts, max_bad_fraction=max_bad_fraction, uri=uri)


def tar_shards_to_crops(batch: dict, *, fs, spec: MultiCropSpec, min_side: int, chunk: int, stats=None,
                        seed: int = 0, max_bad_fraction: float = 1.0, uri: str = ""):
    """``{"path": (N,)}`` tar shards -> crop batches of up to ``chunk`` images, streamed.

    A generator: each shard is read sequentially and its images are decoded and cropped
    ``chunk`` at a time, so memory holds one chunk, not one shard. A corrupt or truncated
    shard is counted once as ``unreadable_shard``; its members before the damage are used.
    A member's augmentation key is (shard path, sample key). A shard the store still fails to
    serve after the retries is counted as ``storage_error_shard`` instead; retries as ``retried``.
    """
    for path in batch["path"]:
        pending: list[bytes] = []
        keys: list[int] = []
        broken = Counter()
        retried_before = getattr(fs, "retried", 0)
        common = {"spec": spec, "min_side": min_side, "stats": stats, "seed": seed,
                  "max_bad_fraction": max_bad_fraction, "uri": uri, "epoch": current_epoch(stats)}
        try:
            with open_shard(fs, str(path)) as f:
                for key, data in iter_tar_images(f):
                    pending.append(data)
                    keys.append(stable_key(f"{path}#{key}"))
                    if len(pending) >= chunk:
                        out = decode_crop_count(pending, keys, **common)
                        pending, keys = [], []
                        if out:
                            yield out
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - tarfile.ReadError, EOFError, OSError, zlib errors...
            broken["skipped.storage_error_shard" if transient(exc) else "skipped.unreadable_shard"] = 1
        broken["retried"] = getattr(fs, "retried", 0) - retried_before
        broken = Counter({k: v for k, v in broken.items() if v})
        if pending or broken:
            out = decode_crop_count(pending, keys, extra=broken, **common)
            if out:
                yield out


# ---------------------------------------------------------------- building the dataset


def resolve_data_source(data: DataSection) -> Source:
    """``data.source`` resolved (listed once); DataError names the URI on failure."""
    source = resolve_source(data.source, data.s3, image_column=data.parquet_image_column)
    if data.shard_images and source.kind == "images":
        raise DataError(f"data.shard_images: {data.source} holds image files, which its listing counts; the "
                        "setting is for tar or Parquet shards, whose images are counted by reading every shard")
    return source


def data_listing(data: DataSection, source: Source | None = None) -> Source | None:
    """The listing of ``data.source``: ``source`` where the caller listed it already, None for the
    built-in scenes (nothing to list), else listed now (``resolve_data_source``)."""
    if source is not None or data.builtin_scenes:
        return source
    return resolve_data_source(data)


def shard_images(d: DataSection, source: Source, announce: Callable[[str], None] | None = None) -> int:
    """The images of a shard source: ``data.shard_images`` where the user gave it, else counted
    (once per ``source``; see ``count_samples``)."""
    return d.shard_images or count_samples(source, announce=announce)


@dataclass
class TrainData:
    dataset: "ray.data.Dataset"
    num_images: int  # images listed (before any skips): sizes the LR schedule
    stats: DataCounts  # the run's counts; call stats.set_epoch before reading each epoch
    source: Source | None = None  # None for the built-in scenes
    # Rows come in a new global order every epoch (the built-in scenes): the workers' local
    # shuffle buffer would only delay each epoch's first batch.
    shuffled_at_source: bool = False


def _path_blocks(paths: list[str], rows_per_block: int) -> "ray.data.Dataset":
    """A dataset of ``{"path"}`` rows in several blocks (Ray Data parallelises per block)."""
    import pyarrow as pa

    table = pa.table({"path": pa.array(paths, pa.string())})
    step = max(1, rows_per_block)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(paths), step)])


def build_train_data(d: DataSection, seed: int, stats: DataCounts | None = None,
                     source: Source | None = None, announce: Callable[[str], None] | None = None) -> TrainData:
    """The training dataset for ``d.source`` (any kind of source; see the module doc).
    ``announce``: told before the images of shards are counted by reading them."""
    spec = crop_spec(d)
    if d.augment_on == "device":
        spec = ShipToDevice(spec)  # ship bytes (scenes: pixels) + keys; see rayssl.data.gpu_augment
    stats = stats if stats is not None else DataCounts()
    if d.builtin_scenes:
        n = d.scenes_num_images
        blocks = max(1, min(64, n // max(1, d.read_batch_size)))
        ds = ray.data.range(n, override_num_blocks=blocks).map_batches(
            crop_scenes,
            batch_size=d.read_batch_size,
            fn_kwargs={"seed": split_seed(seed, "train"), "size": d.scenes_image_size,
                       "spec": spec, "stats": stats, "num_images": n},
        )
        return TrainData(ds, n, stats, shuffled_at_source=True)

    source = data_listing(d, source)
    common = {"spec": spec, "min_side": min_image_side(d), "stats": stats, "seed": seed,
              "max_bad_fraction": float(d.max_bad_fraction), "uri": source.uri}
    # Visit files/shards in a seeded random order (sorted listings put whole classes
    # together), and the blocks in a new order every epoch -- except in deterministic mode,
    # where the order is the seeded one every epoch (the local shuffle still varies by epoch).
    rng = np.random.default_rng(seed)
    paths = [source.paths[i] for i in rng.permutation(len(source.paths))]

    if source.kind == "images":
        # Blocks of whole read batches, at most ~2000 of them however large the listing
        # (one task streams through a block a read batch at a time).
        per_block = d.read_batch_size * max(1, -(-len(paths) // (2000 * d.read_batch_size)))
        ds = epoch_block_order(d, _path_blocks(paths, per_block)).map_batches(
            fetch_decode_and_crop, batch_size=d.read_batch_size, fn_kwargs={"fs": source.fs, **common},
        )
        return TrainData(ds, len(paths), stats, source)
    if source.kind == "webdataset":
        ds = epoch_block_order(d, _path_blocks(paths, 1)).map_batches(
            tar_shards_to_crops, batch_size=1,
            fn_kwargs={"fs": source.fs, "chunk": d.read_batch_size, **common},
        )
        return TrainData(ds, shard_images(d, source, announce), stats, source)
    if source.kind == "parquet":
        ds = ray.data.read_parquet(
            paths, filesystem=source.pyarrow_fs, shuffle=None if d.deterministic else "files",
        ).select_columns([source.image_column]).map_batches(  # only the image column is read
            decode_and_crop, batch_size=d.read_batch_size, fn_kwargs={"column": source.image_column, **common})
        return TrainData(ds, shard_images(d, source, announce), stats, source)
    raise DataError(f"data source {source.uri}: unsupported kind {source.kind!r}")  # pragma: no cover
