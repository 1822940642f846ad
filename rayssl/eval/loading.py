"""Read the backbone out of a rayssl checkpoint (pure PyTorch + fsspec, no Ray).

``--checkpoint`` in ``rayssl.eval``, ``rayssl.export`` and ``rayssl.viz`` takes either one
checkpoint directory (``.../checkpoint_<time>/``, holding ``model.pt`` and ``manifest.json``)
or a whole run directory (``--output`` of ``rayssl.train``), whose newest *complete*
checkpoint is used. Local paths and ``s3://`` URIs both work.

Every method stores its online backbone under the ``backbone.`` prefix of the model state
(SwAV: the network; MLS/MoCo: the query encoder, as MoCo's own export uses). The backbone
architecture comes from the checkpoint's stored config (``model.backbone``,
``model.small_stem``), never from a guess on tensor shapes.
"""

from __future__ import annotations

import io
import posixpath
from collections import OrderedDict
from dataclasses import dataclass

import torch

from rayssl.checkpoint import MODEL_FILE, CheckpointError, verify_checkpoint_dir
from rayssl.storage import S3Options, filesystem

BACKBONE_PREFIX = "backbone."


@dataclass
class LoadedCheckpoint:
    uri: str  # the checkpoint directory actually read
    method: str  # "swav" | "mls" | "moco" | ...
    config: dict  # the run's resolved config (Config.to_dict())
    model_state: dict  # the method module's state_dict
    epoch: int | None

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


def _newest_complete(fs, run_dir: str, uri: str) -> str:
    try:
        entries = fs.ls(run_dir, detail=True)
    except (FileNotFoundError, OSError):
        raise CheckpointError(f"--checkpoint {uri}: does not exist") from None
    dirs = sorted((e["name"].rstrip("/") for e in entries
                   if e.get("type") == "directory" and posixpath.basename(e["name"].rstrip("/")).startswith("checkpoint_")),
                  reverse=True)
    for d in dirs:
        try:
            verify_checkpoint_dir(d, fs=fs)
            return d
        except CheckpointError:
            continue  # an interrupted save: try the one before it
    if dirs:
        raise CheckpointError(f"--checkpoint {uri}: none of its {len(dirs)} checkpoint_* directories is complete")
    raise CheckpointError(f"--checkpoint {uri}: not a rayssl checkpoint (no manifest.json) "
                          "and not a rayssl run (no checkpoint_* directories)")


def resolve_checkpoint_dir(uri: str, options: S3Options | None = None) -> tuple[object, str]:
    """``uri`` (a checkpoint or a run directory) -> (fsspec filesystem, checkpoint dir path).

    Raises CheckpointError (one line naming ``uri``) for anything that is not a complete
    rayssl checkpoint: a missing path, a plain ``.pth`` file, a directory without a manifest.
    """
    fs, path = filesystem(str(uri), options)
    path = path.rstrip("/")
    try:
        if fs.isfile(path):
            raise CheckpointError(f"--checkpoint {uri}: is a file, not a rayssl checkpoint directory "
                                  "(expected a directory holding model.pt and manifest.json, or a run directory)")
        present = fs.exists(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - permission / credential errors from s3fs
        raise CheckpointError(f"--checkpoint {uri}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not present:
        raise CheckpointError(f"--checkpoint {uri}: does not exist")
    if fs.exists(f"{path}/{MODEL_FILE}") or fs.exists(f"{path}/manifest.json"):
        try:
            verify_checkpoint_dir(path, fs=fs)
        except CheckpointError as exc:
            raise CheckpointError(f"--checkpoint {uri}: {exc}") from None
        return fs, path
    return fs, _newest_complete(fs, path, uri)


def load_checkpoint(uri: str, options: S3Options | None = None) -> LoadedCheckpoint:
    """Load a rayssl checkpoint's shared state on the CPU; CheckpointError if it is not one."""
    fs, path = resolve_checkpoint_dir(uri, options)
    with fs.open(f"{path}/{MODEL_FILE}", "rb") as f:
        data = f.read()
    try:
        # weights_only=False: the state holds the config and optimiser state (plain Python
        # objects). Only load checkpoints you trust, as with any pickle.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise CheckpointError(f"--checkpoint {uri}: {MODEL_FILE} is not readable by torch.load ({exc})") from None
    if not isinstance(state, dict) or not {"method", "model", "config"} <= set(state):
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"--checkpoint {uri}: {MODEL_FILE} is not a rayssl checkpoint "
                              f"(no 'method'/'model'/'config' entries; found {keys})")
    if not any(k.startswith(BACKBONE_PREFIX) for k in state["model"]):
        raise CheckpointError(f"--checkpoint {uri}: the model state holds no '{BACKBONE_PREFIX}*' weights")
    shown = path if "://" not in str(uri) else f"{str(uri).split('://', 1)[0]}://{path}"
    return LoadedCheckpoint(shown, state["method"], state["config"], state["model"], state.get("epoch"))


def backbone_state_dict(ckpt: LoadedCheckpoint) -> "OrderedDict[str, torch.Tensor]":
    """The online backbone's weights with torchvision's own key names (``conv1.weight``...)."""
    n = len(BACKBONE_PREFIX)
    return OrderedDict((k[n:], v) for k, v in ckpt.model_state.items() if k.startswith(BACKBONE_PREFIX))


def build_frozen_backbone(ckpt: LoadedCheckpoint) -> torch.nn.Module:
    """The checkpoint's backbone as a torchvision ResNet (``fc`` = Identity) in eval mode.

    Loaded strictly: a state that does not fit the stored architecture is an error.
    """
    from rayssl.modules.backbone import build_backbone

    net, _ = build_backbone(ckpt.backbone_name, small_stem=ckpt.small_stem)
    try:
        net.load_state_dict(backbone_state_dict(ckpt), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"--checkpoint {ckpt.uri}: the backbone weights do not fit "
                              f"{ckpt.backbone_name} (small_stem={ckpt.small_stem}): {first}") from None
    return net.eval()
