"""``--data`` -> a resolved source of images: local or ``s3://``, files or shards.

Three kinds of source, told apart by the files found:

* ``images``: image files (jpg, jpeg, png, webp, bmp, tif, tiff, gif), listed recursively
  under a folder or an S3 prefix;
* ``webdataset``: ``.tar`` shards, WebDataset-style (members ``<key>.<ext>`` grouped by
  key: ``000123.png``, ``000123.json``...), given as a prefix or a brace pattern such as
  ``s3://bucket/shards/train-{000000..000127}.tar``;
* ``parquet``: ``.parquet`` shards with a column of encoded image bytes (a binary column,
  or a struct with a ``bytes`` field as Hugging Face datasets store images).

Everything here runs in the driver before training starts, so every problem a user can
fix (missing or empty prefix, a bucket that does not exist, refused credentials, an
unreachable endpoint, a missing image column) is a :class:`DataError` whose one-line
message names the URI -- and never a credential: messages are built from error codes,
not from the exception text of the S3 client.

Also here: brace expansion and sample counting for shards (a ``manifest.json`` written by
``rayssl.data.shards`` when present, tar headers or Parquet footers otherwise). Reading tar
shards is ``rayssl.data.tar``; label tables ``rayssl.data.labels``. No Ray import.
"""

from __future__ import annotations

import itertools
import json
import posixpath
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from fsspec.utils import glob_translate

from rayssl.data.formats import IMAGE_EXTENSIONS, kind_of
from rayssl.data.tar import index_shard
from rayssl.storage import S3Options, filesystem, is_remote, is_s3, is_s3fs, options_for, pyarrow_filesystem
from rayssl.storage.listing import list_objects

MANIFEST_NAME = "manifest.json"  # written next to the shards by rayssl.data.shards

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class DataError(ValueError):
    """The data source cannot be used (missing, empty, unreadable); names the URI."""


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style brace groups, left to right (cartesian product, no nesting).

    ``{000..003}`` is an inclusive numeric range, zero-padded to the width of its
    bounds when they are written with leading zeros or have the same width;
    ``{a,b,c}`` is a list. A pattern without braces expands to itself.

    >>> expand_braces("s3://b/train-{00..02}.tar")
    ['s3://b/train-00.tar', 's3://b/train-01.tar', 's3://b/train-02.tar']
    """
    parts: list[list[str]] = []
    pos = 0
    for m in _BRACE.finditer(pattern):
        parts.append([pattern[pos:m.start()]])
        parts.append(_expand_group(m.group(1), pattern))
        pos = m.end()
    tail = pattern[pos:]
    if "{" in tail or "}" in tail or any("{" in p[0] or "}" in p[0] for p in parts[::2]):
        raise DataError(f"data source {pattern!r}: unbalanced or nested braces in the pattern")
    parts.append([tail])
    return ["".join(combo) for combo in itertools.product(*parts)]


def _expand_group(body: str, pattern: str) -> list[str]:
    m = _RANGE.match(body)
    if m:
        lo_s, hi_s = m.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DataError(f"data source {pattern!r}: empty range {{{body}}} (end before start)")
        padded = (len(lo_s) > 1 and lo_s.startswith("0")) or len(lo_s) == len(hi_s)
        width = max(len(lo_s), len(hi_s)) if padded else 0
        return [str(i).zfill(width) for i in range(lo, hi + 1)]
    if "," in body:
        return body.split(",")
    raise DataError(f"data source {pattern!r}: cannot expand {{{body}}}; use {{000..127}} or {{a,b}}")


# ----------------------------------------------------------------------------- errors


def _safe_endpoint(options: S3Options) -> str:
    url = options.endpoint_url() or "AWS S3"
    return re.sub(r"//[^/@]*@", "//", url)  # never echo userinfo embedded in a URL


def _error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore error (e.g. InvalidAccessKeyId), if any."""
    for e in (exc, exc.__cause__, exc.__context__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = resp.get("Error", {}).get("Code")
            if code:
                return str(code)
    return ""


@contextmanager
def translate_errors(uri: str, options: S3Options, action: str = "list", what: str = "data source"):
    """Turn S3/filesystem exceptions into a one-line DataError naming ``uri`` (no secrets).

    ``what`` names the role of ``uri`` in the message ("data source", "--out", "labels").
    """
    try:
        yield
    except DataError:
        raise
    except PermissionError as exc:
        code = _error_code(exc)
        why = f" ({code})" if code else ""
        hint = ("anonymous access was refused: the bucket is not public" if options.anonymous else
                "credentials come from the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or an instance role); use --s3-anonymous for public buckets")
        raise DataError(f"{what} {uri}: access denied{why}: the credentials were refused or may not "
                        f"{action} it; {hint}") from None
    except FileNotFoundError as exc:
        text = str(exc).lower()
        if is_s3(uri) and "bucket" in text:
            bucket = uri.split("://", 1)[1].split("/", 1)[0]
            raise DataError(f"{what} {uri}: bucket {bucket!r} does not exist "
                            f"(at endpoint {_safe_endpoint(options)})") from None
        raise DataError(f"{what} {uri}: not found") from None
    except Exception as exc:  # noqa: BLE001 - any client failure becomes one clear line
        name = type(exc).__name__
        if name == "NoCredentialsError":
            raise DataError(f"{what} {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role; "
                            "--s3-anonymous for public buckets)") from None
        if is_s3(uri) and (name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                                    "ConnectionError", "ServerDisconnectedError")
                           or isinstance(exc, (ConnectionError, TimeoutError))):
            raise DataError(f"{what} {uri}: cannot reach the S3 endpoint {_safe_endpoint(options)} "
                            "(set --s3-endpoint or AWS_ENDPOINT_URL for S3-compatible stores)") from None
        code = _error_code(exc)
        raise DataError(f"{what} {uri}: cannot {action} it ({code or name})") from None


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A resolved data source: what kind, which files, and how to reach them."""

    uri: str  # as the user gave it
    kind: str  # "images" | "webdataset" | "parquet"
    paths: list[str]  # files, in the filesystem's own form (no scheme)
    options: S3Options = field(default_factory=S3Options)
    image_column: str = "image"
    manifest: dict | None = None  # rayssl.data.shards manifest found next to the shards
    counted: int | None = None  # images in the shards, once ``count_samples`` counted them

    @cached_property
    def fs(self):
        """The fsspec filesystem holding ``paths`` (pickles as its constructor arguments only)."""
        fs, _ = filesystem(self.uri if "{" not in self.uri else expand_braces(self.uri)[0], self.options)
        return fs

    @property
    def pyarrow_fs(self):
        return pyarrow_filesystem(self.fs)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def beside(self, name: str) -> str:
        """The address of file ``name`` next to the (first) listed file, as ``filesystem`` reads
        it: a shards' table named by their manifest."""
        path = posixpath.join(posixpath.dirname(self.paths[0]), name)
        return self.fs.unstrip_protocol(path) if self.remote else path


def list_files(fs, root: str) -> dict[str, int]:
    """{path: size} of every file below ``root`` (recursive), or of ``root`` if a file. On S3 in
    key ranges side by side (``rayssl.storage.listing``): a flat listing is a request per 1,000
    keys, each waiting for the one before."""
    if is_s3fs(fs):
        out = list_objects(fs, root)
    else:
        found = fs.find(root, detail=True)
        out = {p: int(info.get("size") or 0) for p, info in found.items() if info.get("type", "file") != "directory"}
    if not out and fs.isfile(root):
        out = {root: int(fs.size(root) or 0)}
    return out


def glob_files(fs, pattern: str) -> dict[str, int]:
    """{path: size} of the files that the glob ``pattern`` (no scheme; fsspec's rules: ``*``, ``?``,
    ``[...]``, ``**``) matches. On S3, a pattern with a wildcard in a folder's name or ``**``
    (``train/*/*.JPEG``) is matched, by fsspec's own ``glob_translate``, against ``list_files`` of the
    prefix before its first wildcard (a listing in parts): fsspec's glob would list each folder in
    turn, a request or more a folder. Folder markers (keys ending in ``/``) are not files."""
    first = min((i for i in map(pattern.find, "*?[") if i >= 0), default=len(pattern))
    root = pattern[:first].rpartition("/")[0]
    deep = "**" in pattern or "/" in pattern[first:]
    if is_s3fs(fs) and deep and root and not pattern.endswith("/"):
        match = re.compile(glob_translate(pattern)).match
        return {p: s for p, s in list_files(fs, root).items() if not p.endswith("/") and match(p)}
    found = fs.glob(pattern, detail=True)
    return {p: int(i.get("size") or 0) for p, i in found.items() if i.get("type") != "directory"}


def _select(uri: str, listing: dict[str, int], what: str) -> tuple[str, list[str]]:
    """Pick the one kind of data file in ``listing``; errors name the URI."""
    by_kind: dict[str, list[str]] = {}
    for p in sorted(listing):
        if posixpath.basename(p).startswith("."):
            continue  # .DS_Store, ._AppleDouble, editor swap files
        k = kind_of(p)
        if k is not None:
            by_kind.setdefault(k, []).append(p)
    if not by_kind:
        raise DataError(
            f"data source {uri}: {what} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
            ".tar shards or .parquet shards"
        )
    if len(by_kind) > 1:
        found = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
        raise DataError(f"data source {uri}: mixes kinds of data files ({found}); "
                        "point --data at one kind (a narrower prefix or a brace pattern)")
    kind, paths = next(iter(by_kind.items()))
    return kind, paths


def resolve_source(uri: str, options: S3Options | None = None, image_column: str = "image") -> Source:
    """Resolve ``uri`` (local path, ``file://``, ``s3://``; prefix, file, glob or brace
    pattern) into a :class:`Source`, listing it once. Raises DataError naming ``uri``."""
    options = options_for(str(uri), options)
    uri = str(uri)
    if not uri:
        raise DataError("data source is empty")
    is_pattern = "{" in uri or any(c in uri for c in "*?[")
    listing: dict[str, int]
    with translate_errors(uri, options):
        if "{" in uri:
            wanted = expand_braces(uri)
            fs, _ = filesystem(wanted[0], options)
            paths = [filesystem(u, options)[1] for u in wanted]
            listing = {}
            for parent in sorted({posixpath.dirname(p) for p in paths}):
                try:
                    entries = fs.ls(parent, detail=True)
                except FileNotFoundError as exc:
                    if "bucket" in str(exc).lower():
                        raise
                    continue  # the files below are reported missing
                listing.update({i["name"]: int(i.get("size") or 0) for i in entries if i.get("type") != "directory"})
            listing = {_norm(fs, p): s for p, s in listing.items()}
            missing = [u for u, p in zip(wanted, paths) if _norm(fs, p) not in listing]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise DataError(f"data source {uri}: {len(missing)} of {len(wanted)} files do not exist "
                                f"(first: {missing[0]}{more})")
            data = {_norm(fs, p): listing[_norm(fs, p)] for p in paths}
            kind, selected = _select(uri, data, "the pattern")
            selected = [_norm(fs, p) for p in paths if kind_of(p) == kind]  # keep the pattern's order
        elif is_pattern:
            fs, path = filesystem(uri, options)
            listing = glob_files(fs, path)
            if not listing:
                raise DataError(f"data source {uri}: the pattern matches no files")
            kind, selected = _select(uri, listing, "the pattern")
        else:
            fs, path = filesystem(uri, options)
            if not is_remote(uri) and not fs.exists(path):
                raise DataError(f"data source {path!r} does not exist")
            listing = list_files(fs, path)
            if not listing:
                if is_s3(uri):
                    bucket = path.split("/", 1)[0]
                    if not fs.exists(bucket):
                        raise FileNotFoundError("The specified bucket does not exist")
                    raise DataError(f"data source {uri}: the prefix is empty or does not exist")
                raise DataError(f"data source {path!r}: the folder is empty")
            kind, selected = _select(uri, listing, "the prefix" if is_remote(uri) else "the folder")
        manifest = _find_manifest(fs, selected, listing) if kind != "images" else None
        source = Source(uri, kind, selected, options, image_column, manifest)
        if kind == "parquet":
            _check_image_column(source, fs)
    return source


def _norm(fs, path: str) -> str:
    return fs._strip_protocol(path).rstrip("/")


def _find_manifest(fs, selected: list[str], listing: dict[str, int]) -> dict | None:
    parent = posixpath.dirname(selected[0])
    path = posixpath.join(parent, MANIFEST_NAME)
    if path not in listing and not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except Exception:  # an unreadable manifest only costs us the fast count
        return None


def _check_image_column(source: Source, fs) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = source.paths[0]
    with fs.open(first, "rb") as f:
        schema = pq.read_schema(f)
    col = source.image_column
    if col not in schema.names:
        raise DataError(f"data source {source.uri}: Parquet shard {posixpath.basename(first)} has no column "
                        f"{col!r} (columns: {', '.join(schema.names)}); set data.parquet_image_column")
    typ = schema.field(col).type
    ok = pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or (
        pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0)
    if not ok:
        raise DataError(f"data source {source.uri}: column {col!r} holds {typ}, not encoded image bytes "
                        "(binary, or a struct with a 'bytes' field)")


def count_samples(source: Source, max_threads: int = 16, announce: Callable[[str], None] | None = None) -> int:
    """Number of images in ``source``: files, or samples in its shards (kept in ``source.counted``).

    Shards: from ``manifest.json`` for the shards it lists, the others from their tar headers
    (a ranged read per image on S3: slow for many shards) or Parquet footers, read concurrently
    (I/O bound, so threads); ``announce`` is told before such a scan.
    """
    if source.kind == "images":
        return len(source.paths)
    if source.counted is not None:
        return source.counted
    counts: dict[str, int] = {}
    if source.manifest:
        for entry in source.manifest.get("shards", []):
            counts[entry.get("name")] = int(entry.get("samples", 0))
    todo = [p for p in source.paths if posixpath.basename(p) not in counts]
    fs = source.fs
    if todo and announce is not None:
        announce(f"counting the images of {len(todo)} {source.kind} shard(s) of {source.uri} from their "
                 f"{'Parquet footers' if source.kind == 'parquet' else 'tar headers'} (no manifest.json lists "
                 "them); set data.shard_images to their number to skip the count")

    def one(path: str) -> int:
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        # A damaged shard: the reader yields what precedes the damage, and counts the shard.
        return len(index_shard(fs, path)[0])

    with translate_errors(source.uri, source.options, "read"):
        with ThreadPoolExecutor(max(1, min(max_threads, len(todo)))) as pool:
            for path, n in zip(todo, pool.map(one, todo)):
                counts[posixpath.basename(path)] = n
    source.counted = sum(counts[posixpath.basename(p)] for p in source.paths)
    return source.counted
