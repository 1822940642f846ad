"""Listing an S3 prefix in key ranges side by side, not one page after another.

S3 answers at most 1,000 keys a listing request, and each page of a flat listing needs the
continuation token of the page before it: a prefix of 1.28 M images (ImageNet's ``train/``) is
1,282 requests in a row, minutes of a run's start. The keys below a prefix are sorted, so any
strings cut them into disjoint ranges, and ranges can be listed at the same time (``StartAfter``
opens a range; it ends at the first key past its upper bound).

``list_objects`` asks for the first page of the flat listing; a prefix that fits in it is done
(one request, as before). The rest is listed in parts by up to ``CONCURRENCY`` listers:

- when that page's keys are in folders, one listing with a delimiter gives the prefix's folders,
  and the folders cut the prefix into up to ``MOST_CUTS`` parts of about ``RANGE_PAGES`` pages
  or more (the first page's keys tell how many keys a folder holds; ``folder_cuts``);
- else, or when that makes fewer than 2 parts, the keys after the first page are one part.

Whenever a lister has a page in hand and another has nothing to do, the part it is listing is
split where it stands (``cut_points``): it keeps the part just after its page, and the parts
beyond go to the others. The cuts are the page's last key cut short and one character of the
keys seen on the first page put after it, at the shortest length that leaves any cut inside
the part: ``img/1`` ... ``img/f`` after ``img/0`` when the names are hashes, ``img/01`` ...
``img/09`` when they count up and ``img/0`` holds the rest. So a flat folder of many files is
listed side by side too, and a folder that holds most keys is split as it goes; a part that
holds none costs a request. A part reads up to a page past its end (keys of the part after it,
dropped), which is why folders make parts of several pages. A directory bucket of S3 Express
One Zone, whose listings are not in key order, is listed flat.

Every page goes through the filesystem's ``_call_s3``, so it is retried and counted like any
other request (``rayssl.storage.retrying``, which also reads the pages' timestamps quickly:
parsing, not the store, is what a listing side by side waits for).
"""

from __future__ import annotations

import asyncio
import os

from fsspec.asyn import sync

__all__ = ["CONCURRENCY", "MOST_CUTS", "PAGE", "cut_points", "folder_cuts", "list_objects"]

CONCURRENCY = 16  # listing requests at once
MOST_CUTS = 64  # parts the folders make, and new parts one split makes, at most
PAGE = 1000  # keys a listing request asks for (S3's most)
RANGE_PAGES = 8  # pages a part cut at folders should hold at least
SPLIT_AFTER = 2  # pages a part has given before it is split
DIRECTORY_BUCKET = "--x-s3"  # the names of S3 Express One Zone's buckets end so


def cut_points(low: str, high: str | None, prefix: str, chars: str, most: int = MOST_CUTS,
               deepest: int | None = None) -> list[str]:
    """Sorted strings strictly between the key ``low`` and ``high`` (None: no bound), below ``prefix``:
    ``low`` cut short after ``prefix`` and the fewest characters that leave any such string, then
    each of ``chars`` that sorts above ``low``'s next character. ``low`` is cut short to at most
    ``deepest`` characters (None: to its whole length). At most ``most``, evenly spread; [] when
    none (``chars`` holds nothing that fits)."""
    chars = "".join(sorted(set(chars)))
    for depth in range(len(prefix), min(len(low), len(low) if deepest is None else deepest) + 1):
        head, after = low[:depth], low[depth:depth + 1]
        cuts = [head + c for c in chars if c > after and (high is None or head + c < high)]
        if cuts:
            return cuts if len(cuts) <= most else [cuts[(i * len(cuts)) // most] for i in range(most)]
    return []


def folder_cuts(folders: list[str], parts: int = MOST_CUTS) -> list[str]:
    """Up to ``parts - 1`` of the sorted ``folders`` (keys ending in ``/``), evenly spread, without
    their ``/``: a folder's own marker key and its files (``f/...``) all sort after ``f``."""
    names = sorted(f.rstrip("/") for f in folders)
    if len(names) < 2 or parts < 2:
        return []  # one folder: a cut would split nothing off
    take = min(parts - 1, len(names) - 1)
    return sorted({names[(i * len(names)) // (take + 1)] for i in range(1, take + 1)})


def _pages_estimate(first: list[dict], prefix: str, folders: int) -> int:
    """The listing's pages, guessed from its ``first`` page's keys (a full page) and its count of
    ``folders``: the folders that page's keys fall in tell the keys a folder holds (at least a
    page's worth if they all fall in one)."""
    seen = {o["Key"][len(prefix):].split("/", 1)[0] for o in first if "/" in o["Key"][len(prefix):]}
    per_folder = PAGE / (len(seen) - 1) if len(seen) > 1 else PAGE
    return int(folders * per_folder / PAGE)


def _query(fs, **kwargs) -> dict:
    """A ListObjectsV2 request's arguments: a page of ``PAGE`` keys, the filesystem's own request options."""
    return {"MaxKeys": PAGE, **kwargs, **fs.req_kw}


def _add(files: dict[str, int], bucket: str, objects: list[dict]) -> None:
    files.update({f"{bucket}/{o['Key']}": int(o.get("Size") or 0) for o in objects})


class _Listers:
    """``concurrency`` listers sharing the parts of one range of keys below ``prefix`` (see the
    module docstring); each page's keys go into ``files`` (one event loop: in turn)."""

    def __init__(self, fs, files: dict[str, int], bucket: str, prefix: str, chars: str, concurrency: int):
        self.fs, self.files, self.bucket, self.prefix, self.chars = fs, files, bucket, prefix, chars
        self.concurrency = concurrency
        self.parts: asyncio.Queue = asyncio.Queue()
        self.idle = 0  # listers waiting for a part

    async def run(self, parts: list[tuple[str | None, str | None]]) -> None:
        """Lists the keys in ``parts``: (after, up to and including), None: open."""
        for part in parts:
            self.parts.put_nowait(part)
        listers = [asyncio.ensure_future(self._lister()) for _ in range(self.concurrency)]
        listed = asyncio.ensure_future(self.parts.join())
        try:  # a lister returns only by failing: its error is the listing's
            done, _ = await asyncio.wait([listed, *listers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in [listed, *listers]:
                task.cancel()

    async def _lister(self) -> None:
        while True:
            self.idle += 1
            low, high = await self.parts.get()
            self.idle -= 1
            await self._part(low, high)
            self.parts.task_done()

    async def _part(self, low: str | None, high: str | None) -> None:
        """The keys in (``low``, ``high``], fewer when the part is split on the way."""
        query = _query(self.fs, Bucket=self.bucket, Prefix=self.prefix, **({} if low is None else {"StartAfter": low}))
        pages, first = 0, None
        async for page in self.fs._list_pages("list_objects_v2", **query):
            pages += 1
            objects = page.get("Contents", [])
            inside = [o for o in objects if high is None or o["Key"] <= high]
            _add(self.files, self.bucket, inside)
            if len(inside) < len(objects):
                return  # past the part's upper bound
            if not inside:
                continue  # (a store's empty page)
            first = first or inside[0]["Key"]
            if pages >= SPLIT_AFTER and page.get("IsTruncated") and self.idle and self.parts.empty():
                # cut no deeper than a character past where the part's keys so far differ: cuts deeper
                # down would split off slivers just after the page (its names have characters the
                # first page's lack), each costing a request and a page read for nothing
                low = inside[-1]["Key"]
                deepest = len(os.path.commonprefix([first, low]))
                cuts = cut_points(low, high, self.prefix, self.chars, deepest=deepest)
                for lo, hi in zip(cuts, [*cuts[1:], high]):
                    self.parts.put_nowait((lo, hi))
                high = cuts[0] if cuts else high


async def _list(fs, path: str, concurrency: int) -> dict[str, int]:
    bucket, _, key = path.strip("/").partition("/")
    prefix = f"{key.rstrip('/')}/" if key else ""
    files: dict[str, int] = {}
    query = _query(fs, Bucket=bucket, Prefix=prefix)
    if bucket.endswith(DIRECTORY_BUCKET):  # S3 Express lists unsorted and takes no StartAfter: flat
        async for page in fs._list_pages("list_objects_v2", **query):
            _add(files, bucket, page.get("Contents", []))
        return files
    first = await fs._call_s3("list_objects_v2", **query)
    objects = first.get("Contents", [])
    _add(files, bucket, objects)
    if not (first.get("IsTruncated") and objects):
        return files
    parts: list[tuple[str | None, str | None]] = [(objects[-1]["Key"], None)]  # after the first page
    if any("/" in o["Key"][len(prefix):] for o in objects):
        folders: list[str] = []
        async for page in fs._list_pages("list_objects_v2", **query, Delimiter="/"):
            folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            _add(files, bucket, page.get("Contents", []))
        cuts = folder_cuts(folders, min(MOST_CUTS, _pages_estimate(objects, prefix, len(folders)) // RANGE_PAGES))
        if cuts:
            parts = list(zip([None, *cuts], [*cuts, None]))
    chars = "".join({c for o in objects for c in o["Key"][len(prefix):]})
    await _Listers(fs, files, bucket, prefix, chars, concurrency).run(parts)
    return files


def list_objects(fs, path: str, concurrency: int = CONCURRENCY) -> dict[str, int]:
    """{bucket/key: size} of every object below the prefix ``path`` (``bucket/key``, no scheme) of
    the s3fs filesystem ``fs``, folders' marker objects (keys ending in ``/``) included, as
    ``fs.find`` gives them; {} for a prefix with nothing below it. ``concurrency``: listing
    requests at once."""
    return sync(fs.loop, _list, fs, path, concurrency)
