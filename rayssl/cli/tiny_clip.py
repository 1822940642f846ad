"""``rayssl tiny-clip`` / ``python -m rayssl tiny-clip``: train the offline stand-in CLIP on the
built-in scenes and their captions (``rayssl.pseudolabel.tiny_clip``), for machines that cannot
download a real CLIP checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rayssl.cli.common import UserError, run_command
from rayssl.pseudolabel.tiny_clip import train_tiny_clip

PROG = "rayssl tiny-clip"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train rayssl's tiny CLIP on generated scenes and their "
                                                       "captions (CPU, a minute or two).")
    p.add_argument("--out", required=True, help="checkpoint file to write (refuses to overwrite)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    p.add_argument("--seconds", type=float, default=120.0, help="stop after this many seconds (default 120)")
    p.add_argument("--batch-size", type=int, default=64, help="scenes per step (default 64)")
    p.add_argument("--num-scenes", type=int, default=4096, help="scenes to train on (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def prepare() -> argparse.Namespace:
        if Path(args.out).exists() and not args.overwrite:
            raise UserError(f"--out: {args.out} exists; pass --overwrite or choose another path")
        for name in ("steps", "batch_size", "num_scenes"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        return args

    def execute(a: argparse.Namespace) -> dict:
        return train_tiny_clip(a.out, steps=a.steps, seconds=a.seconds, batch_size=a.batch_size,
                               num_scenes=a.num_scenes, seed=a.seed, log=lambda m: print(m, file=sys.stderr, flush=True))

    return run_command(prog, prepare, execute)
