"""S3 with one retry layer, rayssl's own, which counts what it retries.

A request to an object store fails now and then: 503 SlowDown under load, a 500, a dropped
connection, a body cut short, a read that stalls. s3fs and botocore each retry some of these,
in two nested loops that multiply (5 x 5 attempts) and that nobody can count. Here both are set
to a single attempt and ``RetryingS3FileSystem`` retries instead, in one place:

- every S3 API call (listing, HEAD, GET, PUT, multipart parts), and
- the reading of a GET's body (whole objects, byte ranges, and the range reads of an open
  file, which is how tar shards stream),

up to ``S3Options.max_retries`` times after the first attempt, with capped exponential backoff
and jitter, on transient failures only (``transient``): HTTP 5xx and 429, throttling codes,
connection errors, truncated bodies and timeouts. A stall is cut by ``S3Options.timeout_s``
(the client's connect and read timeouts) and retried like the rest. A missing object or a
refused permission fails at once. Each retry adds one to the filesystem's ``retried``, which
the data pipeline reports as the run's ``retried`` count; a request that still fails after its
retries is marked (``exhausted``) so an outer read does not retry it again, and the pipeline
skips that object as ``storage_error`` -- never as a corrupt image.

The filesystem's responses are also read faster: botocore parses every timestamp with dateutil,
which is about 70% of the time a listing page of 1,000 keys takes to parse (51 of 73 us a key),
and a listing in ranges side by side is bound by that parsing (``rayssl.storage.listing``).
``iso_timestamp`` reads S3's ISO 8601 timestamps with ``datetime.fromisoformat`` (the same
instants, in UTC) and hands anything else to botocore's parser.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import datetime
from typing import Awaitable, Callable

import s3fs
from botocore.utils import parse_timestamp
from fsspec.asyn import sync_wrapper
from s3fs.core import S3File

__all__ = ["RetryingS3FileSystem", "exhausted", "fetch_objects", "iso_timestamp", "transient"]

# Error codes S3 and compatible stores send for "try again later" (beside any 5xx / 429).
RETRY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                         "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests", "RequestTimeTooSkewed"})
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.25, 20.0
_EXHAUSTED = "_rayssl_storage_exhausted"


def _transient_types() -> tuple[type, ...]:
    import http.client

    import aiohttp
    import botocore.exceptions as be
    import botocore.parsers
    import urllib3.exceptions

    return (TimeoutError, asyncio.TimeoutError, ConnectionError, http.client.IncompleteRead,
            urllib3.exceptions.IncompleteRead, urllib3.exceptions.ProtocolError, aiohttp.ClientError,
            be.HTTPClientError, be.ConnectionError, be.ResponseStreamingError, botocore.parsers.ResponseParserError)


def transient(exc: BaseException) -> bool:
    """Whether a failed request is worth another attempt: a server or network failure, not a
    missing object, a refused permission or a bad request (its causes are looked through, as
    s3fs wraps the client's errors in OSErrors)."""
    types = _transient_types()
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status >= 500 or status == 429 or response["Error"].get("Code") in RETRY_CODES
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return False
        if isinstance(e, types):
            return True
        e = e.__cause__ or e.__context__
    return False


def exhausted(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage failure that outlived its retries (or was not worth one)."""
    return bool(getattr(exc, _EXHAUSTED, False))


def iso_timestamp(value) -> datetime:
    """A response's timestamp: S3's ISO 8601 (``2026-12-07T10:00:00.000Z``) by ``fromisoformat``,
    as an aware datetime in UTC; anything else (an HTTP date, epoch seconds) by botocore's parser."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return parse_timestamp(value)


def _backoff(retry: int) -> float:
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** retry) * random.uniform(0.5, 1.0)


def _give_up(exc: BaseException) -> BaseException:
    try:
        setattr(exc, _EXHAUSTED, True)
    except AttributeError:  # pragma: no cover - an exception type without a __dict__
        pass
    return exc


class RetryingS3FileSystem(s3fs.S3FileSystem):
    """An ``s3fs.S3FileSystem`` whose requests and reads are retried here, and counted
    (``retried``). Pickles as its constructor arguments, like any fsspec filesystem."""

    retries = 1  # s3fs's own retry loop (a class attribute there): one attempt

    def __init__(self, *args, max_retries: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_retries = int(max_retries)
        self.retried = 0

    def _next_delay(self, exc: BaseException, retry: int) -> float | None:
        """Seconds to wait before retry number ``retry + 1``, or None to give up."""
        if exhausted(exc) or retry >= self.max_retries or not transient(exc):
            return None
        self.retried += 1
        return _backoff(retry)

    async def _retrying(self, attempt: Callable[[], Awaitable]):
        retry = 0
        while True:
            try:
                return await attempt()
            except Exception as exc:  # noqa: BLE001 - classified by transient()
                delay = self._next_delay(exc, retry)
                if delay is None:
                    raise _give_up(exc)
                retry += 1
                await asyncio.sleep(delay)

    def retrying_sync(self, attempt: Callable[[], object]):
        retry = 0
        while True:
            try:
                return attempt()
            except Exception as exc:  # noqa: BLE001 - classified by transient()
                delay = self._next_delay(exc, retry)
                if delay is None:
                    raise _give_up(exc)
                retry += 1
                time.sleep(delay)

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 - s3fs's signature
        s3 = await super().set_session(refresh=refresh, kwargs=kwargs)
        # every client of the session reads its responses' timestamps so (the parser is made per response)
        self.session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=iso_timestamp)
        return s3

    _connect = set_session  # s3fs binds both to its own set_session at class level
    connect = sync_wrapper(set_session)

    async def _call_s3(self, method, *akwarglist, **kwargs):
        return await self._retrying(lambda: s3fs.S3FileSystem._call_s3(self, method, *akwarglist, **kwargs))

    # s3fs binds its synchronous twin to its own _call_s3 at class level; an open file's writes
    # (multipart uploads, the final PUT) go through it, so it must wrap the retried one.
    call_s3 = sync_wrapper(_call_s3)

    async def _cat_file(self, path, version_id=None, start=None, end=None, **kwargs):
        # The GET is retried inside (_call_s3); a body cut short or stalled is retried here.
        return await self._retrying(lambda: s3fs.S3FileSystem._cat_file(self, path, version_id=version_id,
                                                                          start=start, end=end, **kwargs))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        # s3fs builds its S3File directly: the same object becomes a _RetryingS3File, and its read
        # cache (built with the old bound method) fetches through the retried one.
        f.__class__ = _RetryingS3File
        if getattr(getattr(f, "cache", None), "fetcher", None) is not None:
            f.cache.fetcher = f._fetch_range
        return f


class _RetryingS3File(S3File):
    def _fetch_range(self, start, end):
        return self.fs.retrying_sync(lambda: S3File._fetch_range(self, start, end))


def fetch_objects(fs, paths: list[str], starts: list[int] | None = None,
                  ends: list[int] | None = None) -> tuple[list[bytes | None], Counter]:
    """Whole objects (or byte ranges) in one concurrent fetch -> (bytes or None per path, counts).

    Counts: ``retried`` (retries this fetch needed), ``skipped.storage_error`` (objects that
    still failed after their retries: the store, not the image) and ``skipped.read_error``
    (missing since the listing, no permission: the object itself).
    """
    before = getattr(fs, "retried", 0)
    fetched = fs.cat_ranges(paths, starts, ends, on_error="return")
    blobs: list[bytes | None] = []
    counts: Counter = Counter()
    for b in fetched:
        if isinstance(b, BaseException):
            blobs.append(None)
            counts["skipped.storage_error" if transient(b) else "skipped.read_error"] += 1
        else:
            blobs.append(bytes(b))
    counts["retried"] = getattr(fs, "retried", 0) - before
    return blobs, Counter({k: v for k, v in counts.items() if v})
