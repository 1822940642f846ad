"""Writes through pyarrow that cannot fail silently.

``pyarrow.fs.copy_files`` (Ray Train's checkpoint upload) ignores the error of closing an
output stream; for an S3 file of less than one part that is where the upload happens, so a
failed upload passed unnoticed. ``CheckedFSSpecHandler`` wraps each output stream's file so a
failed close is recorded (per process) before it is raised; whoever started the copy asks
``take_write_failures()`` afterwards. Pure Python: no Ray here.
"""

from __future__ import annotations

import threading

import pyarrow.fs as pafs
from pyarrow import PythonFile

__all__ = ["CheckedFSSpecHandler", "take_write_failures"]

_failures: list[tuple[str, BaseException]] = []
_lock = threading.Lock()


def take_write_failures() -> list[tuple[str, BaseException]]:
    """The (path, error) of every write that failed on close in this process since the last call."""
    with _lock:
        out = list(_failures)
        _failures.clear()
    return out


class _CheckedFile:
    """An fsspec file whose failed ``close`` is recorded, then raised."""

    def __init__(self, f, path: str):
        self._f, self._path = f, path

    def close(self):
        try:
            return self._f.close()
        except BaseException as exc:
            with _lock:
                _failures.append((self._path, exc))
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


class CheckedFSSpecHandler(pafs.FSSpecHandler):
    def open_output_stream(self, path, metadata):
        return PythonFile(_CheckedFile(self.fs.open(path, mode="wb"), path), mode="w")

    def open_append_stream(self, path, metadata):
        return PythonFile(_CheckedFile(self.fs.open(path, mode="ab"), path), mode="w")
