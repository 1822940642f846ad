"""Where files live: local paths or ``s3://`` URIs (through s3fs), for data and for runs.

Ray Train needs ``(storage_path, name, filesystem)``; our own small files (config.yaml,
summary.json, metrics.jsonl) are written through the same filesystem, so a run is in one place.

S3 access always goes through s3fs, with the options of ``S3Options``: the endpoint, anonymous
reads (for a public dataset only), and the S3 client's timeout and retries. The options are
carried explicitly to every process that opens storage -- the driver, Ray Train's controller
and workers, Ray Data tasks and actors, Tune trials -- and never re-derived from a process's
own environment: the endpoint is resolved once, where the command starts (``--s3-endpoint``,
else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` there), and a process asked to open an
``s3://`` URI without options refuses, naming the URI, instead of falling back to AWS.
Credentials come from the standard AWS chain (environment variables, shared profile,
instance role) on every machine, and are never stored in the config or passed in Ray task
arguments: the filesystem objects handed to Ray pickle only their constructor arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

S3_SCHEMES = ("s3://", "s3a://", "s3n://")


class StorageError(RuntimeError):
    """Storage was asked for without the options to reach it (a bug of the caller, named)."""


@dataclass(frozen=True)
class S3Options:
    """How a process reaches S3.

    ``endpoint``: an S3-compatible store's URL ("" = AWS). ``anonymous``: unsigned requests
    (a public bucket). ``timeout_s``: the connect and read timeout of one request, so a read
    that stalls is cut and retried. ``max_retries``: retries after a request's first attempt
    on throttling (503 SlowDown), server errors, dropped connections, bodies cut short and
    timeouts, with capped exponential backoff (``rayssl.storage.retrying``; 4 retries wait
    2-4 s in all), counted as the run's ``retried``.
    """

    endpoint: str = ""
    anonymous: bool = False
    timeout_s: float = 30.0
    max_retries: int = 4

    @classmethod
    def resolved(cls, endpoint: str = "", **kwargs) -> "S3Options":
        """Options whose endpoint is fixed now: the one given, else this process's
        ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (read here, once, where the command starts)."""
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        return cls(endpoint=endpoint or env, **kwargs)

    def endpoint_url(self) -> str | None:
        return self.endpoint or None

    def signed(self) -> "S3Options":
        """The same store, never anonymous: for writes (outputs go to the user's own bucket
        even when ``--s3-anonymous`` reads a public dataset) and the user's own files."""
        return replace(self, anonymous=False)


def options_for(uri: str, options: S3Options | None) -> S3Options:
    """``options``, or (for a URI that is not on S3) the defaults; StorageError for an ``s3://``
    URI without options: a process never guesses the store a user named."""
    if options is not None:
        return options
    if is_s3(uri):
        raise StorageError(f"{uri}: no storage options reached this process (endpoint, anonymity, retries); "
                           "refusing to guess an S3 endpoint")
    return S3Options()


def endpoint_problem(value: str) -> str | None:
    """Why ``value`` is no S3 endpoint ("" means none given, which is fine), or None."""
    if value and "://" not in value:
        return f"must be a URL such as http://127.0.0.1:9000, got {value!r}"
    return None


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEMES)


def is_local_fs(fs) -> bool:
    """Whether the fsspec filesystem ``fs`` is the local disk."""
    import fsspec.implementations.local as local

    return isinstance(fs, local.LocalFileSystem)


def is_s3fs(fs) -> bool:
    """Whether the fsspec filesystem ``fs`` is S3's (s3fs, whose protocols are s3 and s3a)."""
    protocol = getattr(fs, "protocol", ())
    return "s3" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))


def strip_scheme(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key`` (the form fsspec and pyarrow paths take)."""
    return str(uri).split("://", 1)[1] if "://" in str(uri) else str(uri)


def _local(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().absolute()


def s3_filesystem(options: S3Options):
    """An S3 filesystem for ``options`` (credentials from the AWS chain, never stored).

    ``skip_instance_cache`` gives a fresh client (fsspec otherwise reuses one per argument
    set, with its listings cache), so a listing sees what is in the bucket now. The client's
    timeouts cut a stalled request; its retries are rayssl's own, counted
    (``rayssl.storage.retrying``): botocore's and s3fs's loops are set to one attempt.
    """
    from rayssl.storage.retrying import RetryingS3FileSystem

    kwargs: dict = {"anon": options.anonymous, "skip_instance_cache": True, "max_retries": options.max_retries,
                    "config_kwargs": {"connect_timeout": options.timeout_s, "read_timeout": options.timeout_s,
                                      "retries": {"max_attempts": 0, "mode": "standard"}}}
    if options.endpoint_url():
        kwargs["endpoint_url"] = options.endpoint_url()
    return RetryingS3FileSystem(**kwargs)


def filesystem(uri: str, options: S3Options | None = None):
    """(fsspec filesystem, path without scheme) for a local path or a remote URI.

    An ``s3://`` URI needs ``options``: StorageError (naming the URI) without them, never a
    fall-back to whatever endpoint this process's environment names.
    """
    if is_s3(uri):
        return s3_filesystem(options_for(uri, options)), strip_scheme(uri)
    if not is_remote(uri):
        import fsspec

        return fsspec.filesystem("file"), str(_local(uri))
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def pyarrow_filesystem(fs):
    """Wrap an fsspec filesystem for Ray Data / Ray Train (``None`` for the local disk).

    Writes through it that fail when the file is closed (the upload of a small file happens
    then) are recorded for ``take_write_failures``: ``pyarrow.fs.copy_files``, which Ray Train
    uploads checkpoints with, drops the error of a stream's close, so a checkpoint would
    otherwise be reported uploaded with a file missing."""
    import pyarrow.fs as pafs

    if is_local_fs(fs):
        return None
    from rayssl.storage.checked import CheckedFSSpecHandler

    return pafs.PyFileSystem(CheckedFSSpecHandler(fs))


def exists(uri: str, options: S3Options | None = None) -> bool:
    if not is_remote(uri):
        return _local(uri).exists()
    fs, path = filesystem(uri, options)
    return fs.exists(path)


def read_text(uri: str, options: S3Options | None = None) -> str:
    if not is_remote(uri):
        return _local(uri).read_text()
    fs, path = filesystem(uri, options)
    with fs.open(path, "r") as f:
        return f.read()


def write_text(uri: str, text: str, options: S3Options | None = None) -> None:
    """Write a whole small file: locally via a temp file + rename, so it is complete or absent;
    on S3 with one PUT (objects appear whole or not at all)."""
    if not is_remote(uri):
        p = _local(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
        return
    fs, path = filesystem(uri, options)
    fs.pipe(path, text.encode("utf-8"))


def run_location(output: str, options: S3Options | None = None):
    """``output`` -> (storage_path, name, pyarrow filesystem or None) for Ray Train's RunConfig."""
    if not is_remote(output):
        p = _local(output)
        return str(p.parent), p.name, None
    fs, path = filesystem(output, options)
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    return parent, name, pyarrow_filesystem(fs)
