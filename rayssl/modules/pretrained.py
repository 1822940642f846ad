"""A backbone's starting weights (``model.pretrained``, CDUL's ``cdul.init_checkpoint``).

Where they can come from:

* a file, local or ``s3://``: a torchvision or timm state dict (an ImageNet checkpoint, a
  ``rayssl export`` of another run; ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and
  DDP's ``module.`` prefix are unwrapped);
* a rayssl checkpoint or run directory (its newest complete checkpoint's online backbone);
* ``torchvision`` / ``torchvision:<WEIGHTS>`` (e.g. ``torchvision:IMAGENET1K_V2``) and ``timm`` /
  ``timm:<tag>``: the library's published weights for the backbone's architecture, *only*
  from the local cache. Clusters often have no network at run time: weights that are not
  cached are refused with one line naming the cache, never downloaded.

The weights load strictly into the backbone. A classifier head the backbone does not have
(torchvision's ``fc``, timm's ``head`` ...) is dropped and said so; anything else that does not
fit is refused with the lists of missing and unexpected keys. Pure PyTorch (no Ray).
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict

import torch

from rayssl.checkpoint import CheckpointError, LoadedCheckpoint, backbone_state_dict, load_checkpoint
from rayssl.modules.backbone import build_backbone, is_timm, timm_name
from rayssl.sections import ConfigError
from rayssl.storage import S3Options, filesystem

# Parameter prefixes of classifier heads that a backbone built without a classifier lacks.
HEAD_PREFIXES = ("fc.", "head.", "head_dist.", "classifier.", "last_linear.")

__all__ = ["frozen_backbone", "load_into", "read_weights"]


def _listed(keys: list[str], most: int = 6) -> str:
    return ", ".join(keys[:most]) + (f" ... ({len(keys)} in all)" if len(keys) > most else "")


def _torchvision_cached(arch: str, tag: str, uri: str, flag: str) -> tuple[dict, str]:
    import torchvision

    if is_timm(arch):
        raise ConfigError(f"{flag}: {uri}: torchvision weights need a torchvision model.backbone, got {arch}")
    enum = torchvision.models.get_model_weights(arch)
    try:
        weights = enum[tag or "DEFAULT"]
    except KeyError:
        raise ConfigError(f"{flag}: {uri}: {arch} has no torchvision weights {tag!r}; "
                          f"choose one of {', '.join(w.name for w in enum)}") from None
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(cache, os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: {uri}: the torchvision weights {weights} are not in the local cache {cache} "
                          f"(nothing is downloaded at run time); put {os.path.basename(weights.url)} there (it is "
                          f"{weights.url}), or give the weights as a file")
    return torch.load(path, map_location="cpu", weights_only=True), f"torchvision {weights} ({path})"


def _timm_cached(arch: str, tag: str, uri: str, flag: str) -> tuple[dict, str]:
    """timm's weights for the backbone from the Hugging Face cache on this machine, never the network."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    if not is_timm(arch):
        raise ConfigError(f"{flag}: {uri}: timm weights need a timm:<name> model.backbone, got {arch}")
    name = timm_name(arch) + (f".{tag}" if tag else "")
    try:
        hub_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    except RuntimeError as exc:  # timm: "Invalid pretrained tag (x) for y."
        raise ConfigError(f"{flag}: {uri}: {exc}") from None
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    found = [p for p in (try_to_load_from_cache(hub_id, f, cache_dir=cache)
                         for f in ("model.safetensors", "pytorch_model.bin")) if isinstance(p, str)] if hub_id else []
    if not found:
        raise ConfigError(f"{flag}: {uri}: the timm weights of {name} ({hub_id or 'no hub id'}) are not in the "
                          f"local cache {cache} (nothing is downloaded at run time); cache them "
                          "on a machine with network, or give the weights as a file")
    # timm's own loader, pointed at the cached file: it applies the model's checkpoint filter.
    net = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": found[0]})
    return net.state_dict(), f"timm {name} ({found[0]})"


def _unwrap(obj, uri: str, flag: str) -> dict:
    """A loaded file -> a flat state dict of tensors."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{flag}: {uri} holds no state dict of tensors (a torchvision or timm state dict, a "
                          "rayssl export, or a rayssl checkpoint directory)")
    for prefix in ("module.", "backbone."):  # DDP's wrapper; a rayssl method's whole state
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return OrderedDict(obj)


def read_weights(uri: str, arch: str, options: S3Options | None = None,
                 flag: str = "model.pretrained") -> tuple[dict, str]:
    """``(state dict, where it came from)`` for a backbone of ``arch``; ConfigError naming ``flag``."""
    source, _, tag = uri.partition(":")
    if source == "torchvision":
        return _torchvision_cached(arch, tag, uri, flag)
    if source == "timm":
        return _timm_cached(arch, tag, uri, flag)
    fs, path = filesystem(uri, options)
    if fs.isdir(path):
        try:
            ckpt = load_checkpoint(uri, options, flag=flag)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        return backbone_state_dict(ckpt), f"rayssl {ckpt.method} checkpoint {ckpt.uri}"
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{flag}: {uri} does not exist") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a torch file of tensors
        raise ConfigError(f"{flag}: {uri} is not a torch state dict ({type(exc).__name__})") from None
    return _unwrap(obj, uri, flag), f"file {uri}"


def load_into(backbone: torch.nn.Module, state: dict, arch: str, uri: str, flag: str = "model.pretrained") -> str:
    """Load ``state`` strictly into ``backbone``; returns a note of classifier keys dropped ("" if none)."""
    own = backbone.state_dict()
    dropped = [k for k in state if k not in own and k.startswith(HEAD_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"missing {_listed(missing)}" if missing else "", f"unexpected {_listed(unexpected)}" if unexpected
                 else "", f"other shapes {_listed(wrong, 3)}" if wrong else ""]
        raise ConfigError(f"{flag}: {uri} does not match model.backbone={arch}: "
                          + "; ".join(p for p in parts if p))
    backbone.load_state_dict(state, strict=True)
    return f"dropped its classifier ({_listed(dropped, 4)})" if dropped else ""


def frozen_backbone(ckpt: LoadedCheckpoint) -> torch.nn.Module:
    """The checkpoint's backbone (its architecture from the stored config), loaded strictly, in eval mode."""
    net, _ = build_backbone(ckpt.backbone_name, small_stem=ckpt.small_stem)
    try:
        net.load_state_dict(backbone_state_dict(ckpt), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"--checkpoint {ckpt.uri}: the backbone weights do not fit "
                              f"{ckpt.backbone_name} (small_stem={ckpt.small_stem}): {first}") from None
    return net.eval()
