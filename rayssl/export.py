"""``python -m rayssl.export``: a pretrained backbone alone, in the layout another library loads.

Formats (the backbone of every rayssl method is a torchvision ResNet without ``fc``):

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

import argparse
import io
import json
import pickle
import re
import sys
from collections import OrderedDict
from typing import Sequence

import torch

from rayssl.checkpoint import CheckpointError
from rayssl.eval.loading import LoadedCheckpoint, backbone_state_dict, load_checkpoint
from rayssl.modules.backbone import BACKBONES
from rayssl.outfile import OutputError, check_writable, write_bytes
from rayssl.storage import S3Options, add_s3_flags, configure_s3

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


# ------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rayssl.export",
        description="Write the pretrained backbone of a rayssl checkpoint for torchvision, timm or detectron2.")
    p.add_argument("--checkpoint", required=True,
                   help="a rayssl checkpoint directory or run directory (local or s3://); a run uses its newest "
                        "complete checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS, help="target library")
    p.add_argument("--out", required=True, help="file to write (.pth for torchvision/timm, .pkl for detectron2)")
    p.add_argument("--arch", choices=sorted(BACKBONES), default=None,
                   help="expected backbone; refused if the checkpoint holds another one (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_s3_flags(p, anonymous=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = S3Options.from_args(args)
    configure_s3(options)
    try:
        check_writable(args.out, "--out", overwrite=args.overwrite, options=options)
        ckpt = load_checkpoint(args.checkpoint, options)
        data, notes = export_backbone(ckpt, args.format, args.arch)
        write_bytes(args.out, data, "--out", options)
    except (CheckpointError, ExportError, OutputError) as exc:
        print(f"python -m rayssl.export: error: {exc}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"[rayssl.export] {n.replace('PATH', args.out)}", file=sys.stderr)
    sys.stdout.flush()
    print(json.dumps({"format": args.format, "out": args.out, "arch": ckpt.backbone_name,
                      "small_stem": ckpt.small_stem, "method": ckpt.method, "checkpoint": ckpt.uri,
                      "bytes": len(data)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
