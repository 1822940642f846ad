"""WebDataset ``.tar`` shards: streaming their images, indexing them by byte range, counting them.

A shard groups the members of one sample by key (``000123.png``, ``000123.json``...). Reading
is sequential (``r|*``: no seeking, compressed shards too) and runs inside Ray Data tasks;
indexing reads only the headers of an uncompressed shard, so each image can later be fetched
alone by a ranged read (what CDUL's labelling job and its training rows do). No Ray import.
"""

from __future__ import annotations

import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterator, Sequence

from rayssl.data.formats import IMAGE_EXTENSIONS
from rayssl.storage import is_local_fs

__all__ = ["count_tar_images", "index_shard", "index_tar_images", "iter_tar_images", "iter_tar_samples",
           "open_shard", "sample_key", "scan_tar_shards"]



def sample_key(member_name: str) -> tuple[str, str]:
    """WebDataset member name -> (key, extension): ``a/000123.seg.png`` -> ("000123", "seg.png").

    The key is the member's basename up to its first dot: every member of one sample
    shares it (``000123.png``, ``000123.json``, ``000123.cls``)."""
    base = posixpath.basename(member_name)
    key, _, ext = base.partition(".")
    return key, ext.lower()


def _is_image_ext(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def iter_tar_images(fileobj: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Stream (key, encoded image bytes) out of a tar shard, one per sample key.

    Reads the tar sequentially (``r|*``: no seeking, gzip-compressed shards too), so a
    shard is never held in memory; only one member's bytes at a time. When a sample has
    several image members, the first one wins. Raises tarfile/OS errors on a corrupt
    or truncated shard after yielding what came before the damage.
    """
    last_key = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, ext = sample_key(member.name)
            if not _is_image_ext(ext) or key == last_key:
                continue
            handle = tf.extractfile(member)
            data = handle.read() if handle is not None else b""
            last_key = key
            yield key, data


def iter_tar_samples(fileobj: BinaryIO) -> Iterator[dict[str, bytes]]:
    """Stream whole WebDataset samples: ``{"__key__": key, ext: bytes, ...}`` per key."""
    current: dict[str, bytes] | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, ext = sample_key(member.name)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            handle = tf.extractfile(member)
            current[ext] = handle.read() if handle is not None else b""
    if current is not None:
        yield current


def index_tar_images(fileobj: BinaryIO, partial: list | None = None) -> list[tuple[str, int, int]]:
    """``(key, offset, size)`` of each sample's image, from the tar's headers alone (seeks
    past member data): the bytes ``[offset, offset + size)`` of the shard file are the image
    ``iter_tar_images`` yields for that key (the same first-image-per-sample rule).

    Byte ranges exist only in an uncompressed tar: a compressed one raises
    ``tarfile.ReadError``. On a damaged shard the error propagates; pass ``partial`` (a
    list) to keep the members indexed before the damage, as the streaming reader yields them.
    """
    out = partial if partial is not None else []
    last_key = None
    file_size = fileobj.seek(0, 2)
    fileobj.seek(0)
    with tarfile.open(fileobj=fileobj, mode="r:") as tf:
        for member in tf:
            if member.offset_data + member.size > file_size:  # cut short: the header came, the data did not
                raise tarfile.ReadError(f"member {member.name} is truncated")
            if not member.isfile() or member.issparse():
                continue
            key, ext = sample_key(member.name)
            if not _is_image_ext(ext) or key == last_key:
                continue
            last_key = key
            out.append((key, member.offset_data, member.size))
    return out


def count_tar_images(fileobj: BinaryIO) -> int:
    """Image samples in a tar, from its headers alone (seeks past member data)."""
    return len(index_tar_images(fileobj))


def index_shard(fs, path: str) -> tuple[list[tuple[str, int, int]], bool]:
    """``index_tar_images`` of one shard file -> (members, damaged)."""
    members: list = []
    with _open_for_scan(fs, path) as f:
        try:
            index_tar_images(f, members)
        except (tarfile.TarError, EOFError, OSError):
            return members, True
    return members, False


def scan_tar_shards(fs, paths: Sequence[str], max_threads: int = 16) -> tuple[list[tuple[str, str, int, int]], int]:
    """Every image of the given tar shards, addressed by byte range: ``([(path, key, offset,
    size)] in shard order, number of damaged shards)``. Headers only, read concurrently
    (I/O bound, so threads); a damaged shard contributes the images before the damage."""
    rows: list[tuple[str, str, int, int]] = []
    damaged = 0
    with ThreadPoolExecutor(max(1, min(max_threads, len(paths)))) as pool:
        for path, (members, broken) in zip(paths, pool.map(lambda p: index_shard(fs, p), paths)):
            rows.extend((path, key, off, size) for key, off, size in members)
            damaged += broken
    return rows, damaged


def open_shard(fs, path: str) -> BinaryIO:
    """Open a shard for a sequential read (S3: 8 MiB read-ahead blocks)."""
    if is_local_fs(fs):
        return open(path, "rb")
    return fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")


def _open_for_scan(fs, path: str) -> BinaryIO:
    if is_local_fs(fs):
        return open(path, "rb")
    # Small blocks: a header scan hops from header to header, reading little of the data.
    return fs.open(path, "rb", block_size=1 << 16, cache_type="readahead")
