"""Listing an S3 prefix in key ranges side by side, not one page after another.

S3 answers at most 1,000 keys a listing request, and each page of a flat listing needs the
continuation token of the page before it: a prefix of 1.28 M images (ImageNet's ``train/``) is
1,282 requests in a row, minutes of a run's start. The keys below a prefix are sorted, so any
strings cut them into disjoint ranges, and ranges can be listed at the same time (``StartAfter``
opens a range; it ends at the first key past its upper bound).

``list_objects`` asks for the first page of the flat listing; a prefix that fits in it is done
(one request, as before). Otherwise one listing with a delimiter gives the prefix's folders and
the files directly under it. A prefix with no folders (a flat folder of shards) is done with
that listing. Otherwise the folders are the cut points of up to ``RANGES`` ranges of about
``RANGE_PAGES`` pages or more (the first page's keys tell how many keys a folder holds), listed
``CONCURRENCY`` at a time; a prefix of fewer pages goes on from its first page, page after page.
A directory bucket of S3 Express One Zone, whose listings are not in key order, is listed flat.
Every page goes through the filesystem's ``_call_s3``, so it is retried and counted like any
other request (``rayssl.storage.retrying``).
"""

from __future__ import annotations

import asyncio

from fsspec.asyn import sync

__all__ = ["CONCURRENCY", "PAGE", "RANGES", "cut_points", "list_objects"]

RANGES, CONCURRENCY = 64, 16
PAGE = 1000  # keys a listing request asks for (S3's most)
# Pages a range should hold at least: each range reads past its end by up to a page (the keys of
# the next range, parsed for nothing), so a listing of few pages goes on as one flat listing.
RANGE_PAGES = 8
DIRECTORY_BUCKET = "--x-s3"  # the names of S3 Express One Zone's buckets end so


def cut_points(folders: list[str], ranges: int = RANGES) -> list[str]:
    """Up to ``ranges - 1`` of the sorted ``folders`` (keys ending in ``/``), evenly spread, without
    their ``/``: a folder's own marker key and its files (``f/...``) all sort after ``f``."""
    names = sorted(f.rstrip("/") for f in folders)
    if len(names) < 2 or ranges < 2:
        return []  # one folder: a cut would split nothing off
    take = min(ranges - 1, len(names) - 1)
    return sorted({names[(i * len(names)) // (take + 1)] for i in range(1, take + 1)})


def _query(fs, **kwargs) -> dict:
    """A ListObjectsV2 request's arguments: a page of ``PAGE`` keys, the filesystem's own request options."""
    return {"MaxKeys": PAGE, **kwargs, **fs.req_kw}


def _pages_estimate(first: dict, prefix: str, folders: int) -> int:
    """The listing's pages, guessed from its ``first`` page (full) and its count of ``folders``:
    the folders that page's keys fall in tell the keys a folder holds (at least a page's worth if
    they all fall in one)."""
    seen = {k["Key"][len(prefix):].split("/", 1)[0] for k in first.get("Contents", []) if "/" in k["Key"][len(prefix):]}
    per_folder = PAGE / (len(seen) - 1) if len(seen) > 1 else PAGE
    return int(folders * per_folder / PAGE)


def _add(files: dict[str, int], bucket: str, objects: list[dict]) -> None:
    files.update({f"{bucket}/{o['Key']}": int(o.get("Size") or 0) for o in objects})


async def _listed(fs, files: dict[str, int], bucket: str, upto: str | None = None, **kwargs) -> dict[str, int]:
    """``files`` with the keys of a listing (``kwargs``: its prefix, start, token) added, page after
    page, up to and including ``upto`` (None: to the end)."""
    async for page in fs._list_pages("list_objects_v2", **_query(fs, Bucket=bucket, **kwargs)):
        objects = page.get("Contents", [])
        inside = [o for o in objects if upto is None or o["Key"] <= upto]
        _add(files, bucket, inside)
        if len(inside) < len(objects):
            break  # past the range's upper bound
    return files


async def _range(fs, files: dict[str, int], bucket: str, prefix: str, after: str | None, upto: str | None,
                 gate: asyncio.Semaphore) -> None:
    """The keys below ``prefix`` in (``after``, ``upto``] (None: open) added to ``files``."""
    async with gate:
        await _listed(fs, files, bucket, upto, Prefix=prefix, **({"StartAfter": after} if after is not None else {}))


async def _list(fs, path: str, ranges: int, concurrency: int) -> dict[str, int]:
    bucket, _, key = path.strip("/").partition("/")
    prefix = f"{key.rstrip('/')}/" if key else ""
    files: dict[str, int] = {}
    if bucket.endswith(DIRECTORY_BUCKET):  # S3 Express lists unsorted and takes no StartAfter: flat
        return await _listed(fs, files, bucket, Prefix=prefix)
    first = await fs._call_s3("list_objects_v2", **_query(fs, Bucket=bucket, Prefix=prefix))
    _add(files, bucket, first.get("Contents", []))
    if not first.get("IsTruncated"):
        return files
    folders: list[str] = []
    async for page in fs._list_pages("list_objects_v2", **_query(fs, Bucket=bucket, Prefix=prefix, Delimiter="/")):
        folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        _add(files, bucket, page.get("Contents", []))
    if not folders:
        return files  # every key was in that listing
    ranges = min(ranges, len(folders), _pages_estimate(first, prefix, len(folders)) // RANGE_PAGES)
    if ranges < 2:  # a few pages in all: on from the first page, one after another
        return await _listed(fs, files, bucket, Prefix=prefix, ContinuationToken=first["NextContinuationToken"])
    bounds = [None, *cut_points(folders, ranges), None]
    gate = asyncio.Semaphore(concurrency)
    # (one event loop: the ranges add to the one dict in turn)
    await asyncio.gather(*(_range(fs, files, bucket, prefix, lo, hi, gate) for lo, hi in zip(bounds, bounds[1:])))
    return files


def list_objects(fs, path: str, ranges: int = RANGES, concurrency: int = CONCURRENCY) -> dict[str, int]:
    """{bucket/key: size} of every object below the prefix ``path`` (``bucket/key``, no scheme) of
    the s3fs filesystem ``fs``, folders' marker objects (keys ending in ``/``) included, as
    ``fs.find`` gives them; {} for a prefix with nothing below it."""
    return sync(fs.loop, _list, fs, path, ranges, concurrency)
