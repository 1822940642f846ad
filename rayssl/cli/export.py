"""``rayssl export`` / ``python -m rayssl.export``: write a checkpoint's backbone for torchvision,
timm or detectron2 (``rayssl.export.formats``). Every check runs before anything is written,
and the file is written atomically: on any error nothing is left at ``--out``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rayssl.checkpoint import load_checkpoint
from rayssl.cli.common import add_s3_flags, run_command, s3_options
from rayssl.export.formats import FORMATS, export_backbone
from rayssl.modules.backbone import BACKBONES
from rayssl.outfile import check_writable, write_bytes

PROG = "python -m rayssl.export"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Write the pretrained backbone of a rayssl checkpoint for torchvision, timm or detectron2.")
    p.add_argument("--checkpoint", required=True,
                   help="a rayssl checkpoint directory or run directory (local or s3://); a run uses its newest "
                        "complete checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS, help="target library")
    p.add_argument("--out", required=True, help="file to write (.pth for torchvision/timm, .pkl for detectron2)")
    p.add_argument("--arch", default=None,
                   help=f"expected backbone ({', '.join(BACKBONES)} or timm:<name>); refused if the checkpoint "
                        "holds another one (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_s3_flags(p, anonymous=False)
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    options = s3_options(args)

    def prepare() -> dict:  # the export is written here: every failure is the input's (exit code 2)
        check_writable(args.out, "--out", overwrite=args.overwrite, options=options)
        ckpt = load_checkpoint(args.checkpoint, options)
        data, notes = export_backbone(ckpt, args.format, args.arch)
        write_bytes(args.out, data, "--out", options)
        for n in notes:
            print(f"[rayssl.export] {n.replace('PATH', args.out)}", file=sys.stderr)
        return {"format": args.format, "out": args.out, "arch": ckpt.backbone_name, "small_stem": ckpt.small_stem,
                "method": ckpt.method, "checkpoint": ckpt.uri, "bytes": len(data)}

    return run_command(prog, prepare, lambda result: result)
