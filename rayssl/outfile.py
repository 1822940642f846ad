"""Writing one output file (an export, a picture) whole or not at all, locally or on S3.

Local files are written to a temporary name in the same folder and renamed over the
target, so a crash or a full disk leaves either the complete file or nothing; S3 objects
are written with one PUT (they appear whole or not at all). Whether ``--out`` can be
written is checked *before* any work, so a long export or plot is not wasted on a typo.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rayssl.storage import S3Options, filesystem, is_remote


class OutputError(ValueError):
    """An output path that cannot (or must not) be written."""


def check_writable(uri: str, flag: str = "--out", overwrite: bool = False,
                   options: S3Options | None = None) -> None:
    """Raise OutputError (one line naming ``flag`` and ``uri``) unless ``uri`` can be written."""
    uri = str(uri)
    if not uri:
        raise OutputError(f"{flag}: empty path")
    if is_remote(uri):
        fs, path = filesystem(uri, options)
        if not overwrite and fs.exists(path):
            raise OutputError(f"{flag} {uri}: already exists; choose another path or pass --overwrite")
        return
    p = Path(uri).expanduser()
    if p.is_dir():
        raise OutputError(f"{flag} {uri}: is a directory; give a file name")
    if p.exists() and not overwrite:
        raise OutputError(f"{flag} {uri}: already exists; choose another path or pass --overwrite")
    parent = p.parent if str(p.parent) else Path(".")
    existing = parent
    while not existing.exists():  # the folders we would create must hang off a writable one
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {uri}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {uri}: not writable (no write permission on {existing})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(uri: str, data: bytes, flag: str = "--out", options: S3Options | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (temp file + rename locally; one PUT on S3)."""
    uri = str(uri)
    if is_remote(uri):
        fs, path = filesystem(uri, options)
        fs.pipe(path, data)
        return
    p = Path(uri).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise OutputError(f"{flag} {uri}: not writable ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, p)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)  # nothing half-written stays behind
        if isinstance(exc, OSError):
            raise OutputError(f"{flag} {uri}: write failed ({exc.strerror or exc})") from None
        raise
