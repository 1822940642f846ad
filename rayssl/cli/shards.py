"""``rayssl shards`` / ``python -m rayssl.data.shards``: write WebDataset (.tar) or Parquet shards
of images, in parallel on Ray, from a folder or s3:// prefix of images or from the built-in
scenes (with their labels). Refuses to overwrite existing shards unless ``--overwrite``."""

from __future__ import annotations

import argparse
import time
from typing import Sequence

from rayssl.cli.common import add_s3_flags, run_command, s3_options
from rayssl.data.shards import FORMATS, plan_shards, write_planned

PROG = "python -m rayssl.data.shards"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write WebDataset (.tar) or Parquet shards of images, in parallel on Ray, from a folder or "
                    "s3:// prefix of images or from the built-in scenes (with their labels).")
    p.add_argument("--source", required=True, help="'scenes', or a folder / s3:// prefix of image files")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix for the shards and manifest.json")
    p.add_argument("--format", choices=list(FORMATS), default="webdataset", help="shard format (default webdataset)")
    p.add_argument("--shard-size", type=int, required=True, help="samples per shard")
    p.add_argument("--num-scenes", type=int, default=0, help="with --source scenes: how many scenes")
    p.add_argument("--scene-size", type=int, default=64, help="with --source scenes: image side (default 64)")
    p.add_argument("--seed", type=int, default=0, help="with --source scenes: the seed of the training stream")
    p.add_argument("--image-format", choices=["png", "jpg"], default="png",
                   help="with --source scenes: how scenes are encoded (default png)")
    p.add_argument("--labels", default="", help="labels table or ImageFolder root for a file source (optional; "
                   "the classes also go to <prefix>-labels.csv beside the shards)")
    p.add_argument("--prefix", default="train", help="shard name prefix (default train: train-000000.tar)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards under --out")
    add_s3_flags(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    t0 = time.perf_counter()

    def prepare():
        return plan_shards(args.source, args.out, args.format, args.shard_size, num_scenes=args.num_scenes,
                           scene_size=args.scene_size, seed=args.seed, image_format=args.image_format,
                           prefix=args.prefix, labels=args.labels, overwrite=args.overwrite, s3=s3_options(args))

    def execute(plan) -> dict:
        manifest = write_planned(plan)
        return {"out": args.out, "format": args.format, "shards": len(manifest["shards"]),
                "samples": manifest["num_samples"], "wall_s": round(time.perf_counter() - t0, 1)}

    return run_command(prog, prepare, execute, ray=True, dashboard=False)
