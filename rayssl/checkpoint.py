"""The on-disk checkpoint format (pure PyTorch; Ray only moves the directory).

A checkpoint directory holds:

- ``model.pt``   (written by rank 0): model and optimiser state, step/epoch counters,
  the resolved config, the method name; everything shared by all ranks.
- ``rank_{r}.pt`` (written by every rank r): state that differs per worker, such as
  SwAV's per-worker queue and each worker's RNG states.
- ``manifest.json`` (rank 0, written last): the number of ranks and the name and size of
  every file -- ``model.pt`` and each rank's ``rank_{r}.pt`` (the ranks' sizes are
  gathered to rank 0 with ``gather_rank_sizes``). ``verify_checkpoint_dir`` refuses a
  directory whose manifest is missing or disagrees with the files (a file missing, empty
  or truncated), so a half-written or damaged checkpoint is never resumed.

Ray Train merges the directories that all ranks report into one checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or not a rayssl checkpoint."""


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_rank_state(directory: str | Path, rank: int, state: dict) -> int:
    """Every rank: ``rank_{rank}.pt``; returns its size in bytes (for the manifest)."""
    path = Path(directory) / rank_file(rank)
    _atomic_save(state, path)
    return path.stat().st_size


def gather_rank_sizes(size: int, device: str | torch.device = "cpu") -> list[int]:
    """Collective (every rank calls it): each rank's ``rank_{r}.pt`` size, in rank order.

    ``device``: where the collective runs (the worker's device; nccl needs CUDA tensors).
    Without a process group: ``[size]``.
    """
    from rayssl import dist

    return [int(v) for v in dist.all_gather_cat(torch.tensor([int(size)], dtype=torch.int64, device=device))]


def write_shared_state(directory: str | Path, state: dict, world_size: int,
                       rank_sizes: list[int] | None = None) -> None:
    """Rank 0: ``model.pt`` then the manifest, which marks the checkpoint complete.

    ``rank_sizes``: every rank's ``rank_{r}.pt`` size (``gather_rank_sizes``), recorded so
    that a truncated rank file is caught by ``verify_checkpoint_dir`` rather than on load.
    """
    d = Path(directory)
    if rank_sizes is not None and len(rank_sizes) != world_size:
        raise ValueError(f"rank_sizes has {len(rank_sizes)} entries for world_size {world_size}")
    state = {"format_version": FORMAT_VERSION, **state}
    _atomic_save(state, d / MODEL_FILE)
    files = {MODEL_FILE: (d / MODEL_FILE).stat().st_size}
    files.update({rank_file(r): int(n) for r, n in enumerate(rank_sizes or [])})
    manifest = {"format_version": FORMAT_VERSION, "world_size": world_size, "files": files,
                "epoch": state.get("epoch"), "step": state.get("step"), "method": state.get("method")}
    tmp = d / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, d / MANIFEST_FILE)


def verify_checkpoint_dir(directory: str | Path, fs=None) -> dict:
    """Return the manifest of a complete rayssl checkpoint, or raise CheckpointError.

    ``fs``: an fsspec filesystem holding ``directory`` (e.g. s3fs for a run on S3, with
    ``directory`` as ``bucket/key``); default the local disk.
    """
    if fs is None:
        import fsspec

        fs, d = fsspec.filesystem("file"), str(Path(directory))
    else:
        d = str(directory).rstrip("/")

    def size(name: str) -> int | None:
        try:
            info = fs.info(f"{d}/{name}")
        except (FileNotFoundError, OSError):
            return None
        return int(info.get("size") or 0) if info.get("type") != "directory" else None

    if size(MANIFEST_FILE) is None:
        raise CheckpointError(f"{d} is not a complete rayssl checkpoint (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(fs.cat_file(f"{d}/{MANIFEST_FILE}"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{d}: unreadable {MANIFEST_FILE}: {exc}") from None
    for name, expected in manifest.get("files", {}).items():
        found = size(name)
        if found != expected:
            what = "missing" if found is None else f"{found} bytes where the manifest records {expected}"
            raise CheckpointError(f"{d}: {name} is missing or truncated ({what}); the checkpoint is incomplete")
    for r in range(int(manifest.get("world_size", 1))):
        if not size(rank_file(r)):  # rank files are written atomically; absent or empty = incomplete
            raise CheckpointError(f"{d}: {rank_file(r)} is missing or empty; the checkpoint is incomplete")
    return manifest


def load_shared_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    verify_checkpoint_dir(directory)
    return torch.load(Path(directory) / MODEL_FILE, map_location=map_location, weights_only=False)


def load_rank_state(directory: str | Path, rank: int, map_location: str | torch.device = "cpu") -> dict | None:
    p = Path(directory) / rank_file(rank)
    if not p.is_file():
        return None
    return torch.load(p, map_location=map_location, weights_only=False)
