"""``rayssl scenes`` / ``python -m rayssl.data.scenes``: write the built-in scenes as image files
plus ``labels.csv`` (id, classes, dominant, caption). Deterministic: the same arguments always
give the same bytes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from rayssl.cli.common import run_command
from rayssl.data.scenes import SPLITS, write_image_folder

PROG = "python -m rayssl.data.scenes"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write the built-in synthetic 'scenes' dataset as image files plus labels.csv (id, classes, "
                    "dominant, caption). Deterministic: the same arguments always give the same bytes.")
    p.add_argument("--out", required=True, type=Path, help="output directory (must be empty or absent unless --overwrite)")
    p.add_argument("--n", required=True, type=int, help="number of scenes to write")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="base seed in [0, 2**32) (default 0)")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="which stream: evaluation splits never overlap training (default train)")
    p.add_argument("--format", dest="fmt", choices=("png", "jpg"), default="png", help="image file format (default png)")
    p.add_argument("--layout", choices=("flat", "imagefolder"), default="flat",
                   help="flat: OUT/scene-000000.png; imagefolder: OUT/<dominant>/scene-000000.png")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into a non-empty directory (same-named files are replaced)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def prepare() -> dict:  # written here: every failure is the input's (exit code 2)
        try:
            out = write_image_folder(args.out, args.n, seed=args.seed, size=args.size, fmt=args.fmt,
                                     layout=args.layout, split=args.split, overwrite=args.overwrite)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ValueError(str(exc)) from None
        return {"out": str(out), "scenes": args.n, "size": args.size, "layout": args.layout}

    return run_command(prog, prepare, lambda result: result)
