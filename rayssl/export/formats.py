"""A pretrained backbone alone, in the layout another library loads (``python -m rayssl.export``).

A ``timm:<name>`` backbone exports in the ``timm`` format only: its own ``state_dict``, which
``timm.create_model(<name>, num_classes=0)`` loads strictly. A torchvision ResNet backbone (the
default; ``fc`` removed) exports in three formats:

- ``torchvision``: a ``state_dict`` (``torch.save``) that loads with ``strict=True`` into
  ``torchvision.models.<arch>()`` once its ``fc`` is removed (``model.fc = nn.Identity()``).
- ``timm``: the same tensors under timm's ResNet names (timm's ``resnet18/34/50`` use
  torchvision's key names), loading strictly into ``timm.create_model(<arch>, num_classes=0)``.
  When timm is installed the export is checked by loading it into that model first.
- ``detectron2``: a pickle ``{"model": {name: numpy array}, "__author__": ...,
  "matching_heuristics": True}`` with detectron2's ResNet names (``stem.conv1``,
  ``stem.conv1.norm``, ``res2..res5``, ``conv1..3`` + ``.norm``, ``shortcut`` + ``.norm``), the
  layout detectron2's ``DetectionCheckpointer`` reads for ``MODEL.WEIGHTS`` and the one the
  official SwAV and MoCo/MLS code ship for downstream detection. Use it with
  ``MODEL.RESNETS.STRIDE_IN_1X1: False`` (torchvision puts the stride in the 3x3 conv),
  ``INPUT.FORMAT: RGB`` and torchvision's pixel statistics (printed by the command).

The small-image stem (``model.small_stem``: a 3x3 stride-1 ``conv1`` and no max-pool) has no
equivalent in timm's or detectron2's ResNet, so those exports are refused for it; the
torchvision export works, into a torchvision ResNet whose ``conv1``/``maxpool`` are replaced the
same way (the command prints the two lines).

Every check runs before anything is written, and the file is written atomically: on any
error nothing is left at ``--out``.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict

import torch

from rayssl.checkpoint import LoadedCheckpoint, backbone_state_dict
from rayssl.modules.backbone import build_backbone, is_timm, timm_name

FORMATS = ("torchvision", "timm", "detectron2")

SMALL_STEM_FIX = ("model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False); "
                  "model.maxpool = torch.nn.Identity()")


class ExportError(ValueError):
    """The checkpoint cannot be exported in the requested format."""


# ------------------------------------------------------------------ key layouts (pure)

_TV_KEY = re.compile(r"^(?:layer(?P<stage>\d)\.(?P<block>\d+)\.)?(?P<rest>.+)$")


def detectron2_key(tv_key: str) -> str:
    """One torchvision ResNet key -> detectron2's name for the same tensor.

    ``conv1.weight`` -> ``stem.conv1.weight``; ``bn1.running_mean`` -> ``stem.conv1.norm.running_mean``;
    ``layer2.0.bn3.bias`` -> ``res3.0.conv3.norm.bias``; ``layer1.0.downsample.0.weight`` ->
    ``res2.0.shortcut.weight``; ``layer1.0.downsample.1.weight`` -> ``res2.0.shortcut.norm.weight``.
    """
    m = _TV_KEY.match(tv_key)
    rest = m.group("rest")
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    if m.group("stage") is None:
        return "stem." + rest
    return f"res{int(m.group('stage')) + 1}.{m.group('block')}.{rest}"


def to_detectron2(state: "OrderedDict[str, torch.Tensor]", author: str) -> dict:
    """The detectron2 checkpoint dict for a torchvision ResNet ``state`` (without ``fc``).

    BatchNorm's ``num_batches_tracked`` counters are dropped: detectron2's FrozenBN/BN
    layers have no such buffer.
    """
    model = OrderedDict()
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith("fc."):
            raise ExportError(f"unexpected classifier key {k!r} in a backbone state")
        model[detectron2_key(k)] = v.detach().cpu().numpy()
    return {"model": model, "__author__": author, "matching_heuristics": True}


def torchvision_model(arch: str, small_stem: bool) -> torch.nn.Module:
    """The stock torchvision ResNet an export targets, ``fc`` removed (and the small stem swapped in)."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = torch.nn.Identity()
    if small_stem:
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = torch.nn.Identity()
    return net


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _strict_load(net: torch.nn.Module, state: dict, target: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ExportError(f"the backbone does not load strictly into {target}: {first}") from None


# ------------------------------------------------------------------ export


def export_backbone(ckpt: LoadedCheckpoint, fmt: str, arch: str | None = None) -> tuple[bytes, list[str]]:
    """The export file's bytes and notes for the user (how to load it), or ExportError."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    have = ckpt.backbone_name
    if arch is not None and arch != have:
        raise ExportError(f"--arch {arch}: the checkpoint's backbone is {have}, not {arch} "
                          f"(backbone mismatch; omit --arch or pass --arch {have})")
    state = backbone_state_dict(ckpt)
    notes: list[str] = []
    if is_timm(have):
        if fmt != "timm":
            raise ExportError(f"--format {fmt}: this backbone is the timm model {timm_name(have)}; export it with "
                              "--format timm")
        net, _ = build_backbone(have)
        _strict_load(net, state, f"timm.create_model({timm_name(have)!r}, num_classes=0)")
        buf = io.BytesIO()
        torch.save(OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items()), buf)
        notes.append(f"load: m = timm.create_model({timm_name(have)!r}, num_classes=0); "
                     "m.load_state_dict(torch.load('PATH'), strict=True)")
        if hasattr(net, "pos_embed"):
            notes.append("it was pretrained with dynamic_img_size=True (multi-crop sizes); pass that to "
                         "timm.create_model to feed it images of another size than its default")
        return buf.getvalue(), notes
    if ckpt.small_stem and fmt != "torchvision":
        raise ExportError(
            f"--format {fmt}: this {have} uses rayssl's small-image stem (3x3 stride-1 conv1, no max-pool), "
            f"which {fmt}'s ResNet cannot build; export with --format torchvision and rebuild the stem "
            "as it prints, or pretrain with --set model.small_stem=false")
    if fmt == "torchvision":
        _strict_load(torchvision_model(have, ckpt.small_stem), state, f"torchvision.models.{have} (fc removed)")
        buf = io.BytesIO()
        torch.save(OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items()), buf)
        notes.append(f"load: m = torchvision.models.{have}(); m.fc = torch.nn.Identity(); "
                     "m.load_state_dict(torch.load('PATH'), strict=True)")
        if ckpt.small_stem:
            notes.append("small-image stem: before load_state_dict run " + SMALL_STEM_FIX.replace("model.", "m."))
        return buf.getvalue(), notes
    if fmt == "timm":
        if timm_available():
            import timm

            _strict_load(timm.create_model(have, pretrained=False, num_classes=0), state,
                         f"timm.create_model({have!r}, num_classes=0)")
        else:
            notes.append("timm is not installed here: the key layout was not load-checked")
        buf = io.BytesIO()
        torch.save(OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items()), buf)
        notes.append(f"load: m = timm.create_model({have!r}, num_classes=0); "
                     "m.load_state_dict(torch.load('PATH'), strict=True)")
        return buf.getvalue(), notes
    # detectron2: check the source layout first (a strict load into torchvision), then rename.
    _strict_load(torchvision_model(have, False), state, f"torchvision.models.{have} (fc removed)")
    obj = to_detectron2(state, author=f"rayssl {ckpt.method}")
    depth = {"resnet18": 18, "resnet34": 34, "resnet50": 50}[have]
    cfg = (f"MODEL.WEIGHTS PATH MODEL.RESNETS.DEPTH {depth} MODEL.RESNETS.STRIDE_IN_1X1 False "
           "INPUT.FORMAT RGB MODEL.PIXEL_MEAN [123.675,116.280,103.530] MODEL.PIXEL_STD [58.395,57.120,57.375]")
    if depth < 50:
        cfg += " MODEL.RESNETS.RES2_OUT_CHANNELS 64"
    notes.append("detectron2 config: " + cfg)
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), notes
