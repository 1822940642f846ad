"""Where a run's files live: a local directory or an ``s3://`` URI (through s3fs).

Ray Train needs ``(storage_path, name, filesystem)``; our own small files (config.yaml,
summary.json) are written through the same filesystem, so a run is in one place.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().absolute()


def _fsspec(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return _local(uri).exists()
    fs, path = _fsspec(uri)
    return fs.exists(path)


def read_text(uri: str) -> str:
    if not is_remote(uri):
        return _local(uri).read_text()
    fs, path = _fsspec(uri)
    with fs.open(path, "r") as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    """Write a whole small file; locally via a temp file + rename, so it is complete or absent."""
    if not is_remote(uri):
        p = _local(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
        return
    fs, path = _fsspec(uri)
    with fs.open(path, "w") as f:
        f.write(text)


def run_location(output: str):
    """``output`` -> (storage_path, name, pyarrow filesystem or None) for Ray Train's RunConfig."""
    if not is_remote(output):
        p = _local(output)
        return str(p.parent), p.name, None
    import pyarrow.fs as pafs

    fs, path = _fsspec(output)
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    return parent, name, pafs.PyFileSystem(pafs.FSSpecHandler(fs))
