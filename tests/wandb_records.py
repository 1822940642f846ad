"""Reads a W&B offline run file (``run-<id>.wandb``) without W&B's service, for the tests.

The file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
records framed as LevelDB's log is (crc32, little-endian length, type: full / first / middle /
last), each record a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, parts = HEADER, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a frame is padding
            pos += room
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero padding up to the block's end
            pos += room - 7
            continue
        parts += data[pos:pos + size]
        pos += size
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def offline_run(path: Path) -> dict:
    """``{"id", "project", "history": [{key: value, "_step": step}, ...]}`` of one offline run file."""
    out = {"id": None, "project": None, "history": []}
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["project"] = record.run.run_id, record.run.project
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
    return out


def _finished(path: Path, wait_s: float) -> None:
    """Waits until the run file ends with its exit record, at most ``wait_s``.

    ``run.finish()`` can return before W&B's service has written the run's records to the file
    (seen on a loaded machine: a file without its history, or without its run record); the exit
    record is written last, so once it is there the records before it are too. A file still
    without it after ``wait_s`` is read as it is, and the test's assertions say what is missing."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            kinds = [r.WhichOneof("record_type") for r in _records(path)]
        except Exception:  # a header or a record still being written
            kinds = []
        if kinds and kinds[-1] == "exit":
            return
        time.sleep(0.2)


def offline_runs(wandb_dir: Path, wait_s: float = 60.0) -> list[dict]:
    """Every offline run under ``<dir>/wandb`` (or ``wandb_dir`` itself), oldest first, each read
    once its exit record is written (see ``_finished``)."""
    root = wandb_dir / "wandb" if (wandb_dir / "wandb").is_dir() else wandb_dir
    files = sorted(root.glob("offline-run-*/run-*.wandb"))
    for f in files:
        _finished(f, wait_s)
    return [offline_run(f) for f in files]
