"""Where files live: local paths or ``s3://`` URIs (through s3fs), for data and for runs.

Ray Train needs ``(storage_path, name, filesystem)``; our own small files (config.yaml,
summary.json) are written through the same filesystem, so a run is in one place.

S3 access always goes through s3fs. Credentials come from the standard AWS chain
(environment variables, shared profile, instance role) on every machine that reads or
writes, and are never stored in the config or passed in Ray task arguments: the
filesystem objects we hand to Ray pickle only their constructor arguments (endpoint,
anonymous flag). S3-compatible stores are reached through an explicit endpoint: the
``data.s3_endpoint`` key (``--s3-endpoint``), else the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` environment variables, read when a filesystem is built (pyarrow's
own S3 client ignores those variables, so we always pass the endpoint explicitly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

S3_SCHEMES = ("s3://", "s3a://", "s3n://")


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: an endpoint URL ("" = from the environment, else AWS) and anonymity."""

    endpoint: str = ""
    anonymous: bool = False

    def endpoint_url(self) -> str | None:
        return (self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)

    def signed(self) -> "S3Options":
        """The same endpoint, never anonymous: for writes (outputs go to the user's own bucket
        even when ``--s3-anonymous`` reads a public dataset)."""
        return S3Options(endpoint=self.endpoint)


_default_s3 = S3Options()


def endpoint_problem(value: str) -> str | None:
    """Why ``value`` is no S3 endpoint ("" means none given, which is fine), or None."""
    if value and "://" not in value:
        return f"must be a URL such as http://127.0.0.1:9000, got {value!r}"
    return None


def configure_s3(options: S3Options) -> None:
    """Set the S3 options used by ``exists``/``read_text``/``write_text``/``run_location``
    when they are not given any (the driver calls this once it knows the config).

    Those defaults only ever reach the command's own files (run directories, checkpoints,
    outputs, label tables) in the user's bucket, so they are always signed: ``--s3-anonymous``
    is for a public dataset, whose reads pass their options explicitly."""
    global _default_s3
    _default_s3 = options.signed()


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEMES)


def strip_scheme(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key`` (the form fsspec and pyarrow paths take)."""
    return str(uri).split("://", 1)[1] if "://" in str(uri) else str(uri)


def _local(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().absolute()


def s3_filesystem(options: S3Options | None = None):
    """An ``s3fs.S3FileSystem`` for ``options`` (credentials from the AWS chain, never stored).

    ``skip_instance_cache`` gives a fresh client (fsspec otherwise reuses one per argument
    set, with its listings cache), so a listing sees what is in the bucket now.
    """
    import s3fs

    o = options or _default_s3
    kwargs: dict = {"anon": o.anonymous, "skip_instance_cache": True}
    url = o.endpoint_url()
    if url:
        kwargs["endpoint_url"] = url
    return s3fs.S3FileSystem(**kwargs)


def filesystem(uri: str, options: S3Options | None = None):
    """(fsspec filesystem, path without scheme) for a local path or a remote URI."""
    if is_s3(uri):
        return s3_filesystem(options), strip_scheme(uri)
    if not is_remote(uri):
        import fsspec

        return fsspec.filesystem("file"), str(_local(uri))
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def pyarrow_filesystem(fs):
    """Wrap an fsspec filesystem for Ray Data / Ray Train (``None`` for the local disk)."""
    import fsspec.implementations.local as local
    import pyarrow.fs as pafs

    if isinstance(fs, local.LocalFileSystem):
        return None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


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
