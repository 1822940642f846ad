"""The on-disk checkpoint format, written and read here only (pure PyTorch; Ray only moves the directory).

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

Reading: ``load_shared_state`` / ``load_rank_state`` restore a run (the training engine);
``load_checkpoint`` takes a checkpoint or a whole run directory (its newest *complete*
checkpoint), local or ``s3://``, for every command that reads one (``--checkpoint`` of eval,
export and viz; CDUL's ``init_checkpoint``). Every method stores its online backbone under the
``backbone.`` prefix of the model state (SwAV: the network; MLS/MoCo: the query encoder, as
MoCo's own export uses); the architecture comes from the checkpoint's stored config
(``model.backbone``, ``model.small_stem``), never from a guess on tensor shapes.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayssl.storage import S3Options, filesystem

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"
BACKBONE_PREFIX = "backbone."


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
    """The shared state of the complete local checkpoint ``directory`` (rank 0's ``model.pt``)."""
    verify_checkpoint_dir(directory)
    return torch.load(Path(directory) / MODEL_FILE, map_location=map_location, weights_only=False)


def load_rank_state(directory: str | Path, rank: int, map_location: str | torch.device = "cpu") -> dict | None:
    p = Path(directory) / rank_file(rank)
    if not p.is_file():
        return None
    return torch.load(p, map_location=map_location, weights_only=False)


# ----------------------------------------------------------------------------- reading by URI


@dataclass
class LoadedCheckpoint:
    """A checkpoint's shared state, read on the CPU (``load_checkpoint``)."""

    uri: str  # the checkpoint directory actually read
    state: dict  # everything ``model.pt`` holds (model, optimiser, counters, config, method state)

    @property
    def method(self) -> str:
        return self.state["method"]  # "swav" | "mls" | "moco" | ...

    @property
    def config(self) -> dict:
        return self.state["config"]  # the run's resolved config (Config.to_dict())

    @property
    def model_state(self) -> dict:
        return self.state["model"]  # the method module's state_dict

    @property
    def method_state(self) -> dict:
        return self.state.get("method_state") or {}  # state outside the module (CDUL's label store)

    @property
    def epoch(self) -> int | None:
        return self.state.get("epoch")

    @property
    def backbone_name(self) -> str:
        return self.config["model"]["backbone"]

    @property
    def small_stem(self) -> bool:
        return bool(self.config["model"].get("small_stem", False))

    @property
    def image_size(self) -> int:
        """The large-crop size the backbone was trained on (the natural evaluation size)."""
        return int(self.config["data"]["crop_sizes"][0])


def checkpoint_dirs(fs, run_dir: str) -> list[str]:
    """The ``checkpoint_*`` directories of a run directory (``fs.ls``'s errors pass through)."""
    return [e["name"].rstrip("/") for e in fs.ls(run_dir.rstrip("/"), detail=True)
            if e.get("type") == "directory" and posixpath.basename(e["name"].rstrip("/")).startswith("checkpoint_")]


def progress(fs, path: str) -> tuple[int, str]:
    """How far training had come at the complete checkpoint ``path`` (its manifest's step), then
    its name: the order of checkpoints, whatever the clocks that named them said. Raises
    CheckpointError for an incomplete one."""
    return int(verify_checkpoint_dir(path, fs=fs).get("step") or 0), posixpath.basename(path.rstrip("/"))


def by_progress(fs, dirs: list[str]) -> list[str]:
    """The complete ones of checkpoint directories ``dirs``, in the order of ``progress``."""
    found = []
    for d in dirs:
        try:
            found.append((progress(fs, d), d))
        except CheckpointError:
            continue  # an interrupted save
    return [d for _, d in sorted(found)]


def _newest_complete(fs, run_dir: str, uri: str, flag: str) -> str:
    try:
        dirs = checkpoint_dirs(fs, run_dir)
    except (FileNotFoundError, OSError):
        raise CheckpointError(f"{flag} {uri}: does not exist") from None
    complete = by_progress(fs, dirs)
    if complete:
        return complete[-1]
    if dirs:
        raise CheckpointError(f"{flag} {uri}: none of its {len(dirs)} checkpoint_* directories is complete")
    raise CheckpointError(f"{flag} {uri}: not a rayssl checkpoint (no manifest.json) "
                          "and not a rayssl run (no checkpoint_* directories)")


def resolve_checkpoint_dir(uri: str, options: S3Options | None = None,
                           flag: str = "--checkpoint") -> tuple[object, str]:
    """``uri`` (a checkpoint or a run directory) -> (fsspec filesystem, checkpoint dir path).

    Raises CheckpointError (one line naming ``uri``) for anything that is not a complete
    rayssl checkpoint: a missing path, a plain ``.pth`` file, a directory without a manifest.
    """
    fs, path = filesystem(str(uri), options)
    path = path.rstrip("/")
    try:
        if fs.isfile(path):
            raise CheckpointError(f"{flag} {uri}: is a file, not a rayssl checkpoint directory "
                                  "(expected a directory holding model.pt and manifest.json, or a run directory)")
        present = fs.exists(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - permission / credential errors from s3fs
        raise CheckpointError(f"{flag} {uri}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not present:
        raise CheckpointError(f"{flag} {uri}: does not exist")
    if fs.exists(f"{path}/{MODEL_FILE}") or fs.exists(f"{path}/manifest.json"):
        try:
            verify_checkpoint_dir(path, fs=fs)
        except CheckpointError as exc:
            raise CheckpointError(f"{flag} {uri}: {exc}") from None
        return fs, path
    return fs, _newest_complete(fs, path, uri, flag)


def _read_model_file(fs, path: str, uri: str, flag: str) -> dict:
    with fs.open(f"{path}/{MODEL_FILE}", "rb") as f:
        data = f.read()
    try:
        # weights_only=False: the state holds the config and optimiser state (plain Python
        # objects). Only load checkpoints you trust, as with any pickle.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise CheckpointError(f"{flag} {uri}: {MODEL_FILE} is not readable by torch.load ({exc})") from None


def load_checkpoint(uri: str, options: S3Options | None = None, flag: str = "--checkpoint") -> LoadedCheckpoint:
    """Load a rayssl checkpoint's shared state on the CPU; CheckpointError (one line naming
    ``flag`` and ``uri``) if it is not one.

    ``uri``: a checkpoint directory or a run directory (its newest complete checkpoint), local or ``s3://``.
    """
    fs, path = resolve_checkpoint_dir(uri, options, flag)
    state = _read_model_file(fs, path, uri, flag)
    if not isinstance(state, dict) or not {"method", "model", "config"} <= set(state):
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{flag} {uri}: {MODEL_FILE} is not a rayssl checkpoint "
                              f"(no 'method'/'model'/'config' entries; found {keys})")
    if not any(k.startswith(BACKBONE_PREFIX) for k in state["model"]):
        raise CheckpointError(f"{flag} {uri}: the model state holds no '{BACKBONE_PREFIX}*' weights")
    shown = path if "://" not in str(uri) else f"{str(uri).split('://', 1)[0]}://{path}"
    return LoadedCheckpoint(shown, state)


def backbone_state_dict(ckpt: LoadedCheckpoint) -> "OrderedDict[str, torch.Tensor]":
    """The online backbone's weights with torchvision's own key names (``conv1.weight``...)."""
    n = len(BACKBONE_PREFIX)
    return OrderedDict((k[n:], v) for k, v in ckpt.model_state.items() if k.startswith(BACKBONE_PREFIX))
