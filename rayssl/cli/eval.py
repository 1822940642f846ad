"""``rayssl eval`` / ``python -m rayssl.eval``: score a pretrained backbone on frozen features.

    python -m rayssl.eval --checkpoint RUN_OR_CHECKPOINT --data scenes|PATH|URI [--labels URI]
                          --protocol knn|linear|multilabel-linear

See ``rayssl.eval.evaluate`` for the protocols and data forms. A table goes to stdout, then
one JSON line as the last line; progress goes to stderr. Bad input stops before Ray starts
with one line naming the option.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Sequence

from rayssl.checkpoint import load_checkpoint
from rayssl.cli.common import UserError, add_gpu_flag, add_s3_flags, gpu_choice, run_command, s3_options
from rayssl.config import ConfigError
from rayssl.data.sources import DataError
from rayssl.eval.evaluate import PROTOCOLS, EvalError, EvalRequest, evaluate, format_table, open_sources
from rayssl.eval.job import ActorPool
from rayssl.runtime.cluster import capacity, place

PROG = "python -m rayssl.eval"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Evaluate the frozen backbone of a rayssl checkpoint (kNN / linear probes).")
    p.add_argument("--checkpoint", required=True,
                   help="rayssl checkpoint directory, or a run directory (its newest complete checkpoint); local or s3://")
    p.add_argument("--data", default="scenes",
                   help="'scenes' (built-in held-out scenes), an ImageFolder folder/prefix (class = parent folder), or "
                        "images / .tar / .parquet shards with --labels")
    p.add_argument("--labels", default=None,
                   help="labels table (.csv / .parquet: id + class column, classes joined by '|') or an ImageFolder "
                        "tree; default: the class folders of --data")
    p.add_argument("--protocol", choices=PROTOCOLS, default="knn",
                   help="knn: cosine kNN top-1; linear: linear-probe top-1; multilabel-linear: linear-probe mAP")
    p.add_argument("--test-data", default=None, help="held-out images (same forms as --data); default: split --data")
    p.add_argument("--test-labels", default=None, help="labels of --test-data (default: its class folders, or --labels)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share when --data is split (default 0.2)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    p.add_argument("--num-train", type=int, default=1000, help="scenes: labelled training images (default 1000)")
    p.add_argument("--num-test", type=int, default=500, help="scenes: held-out test images (default 500)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size for the backbone (default: the checkpoint's large-crop size)")
    p.add_argument("--seed", type=int, default=0, help="scenes stream / split / probe seed (default 0)")
    add_gpu_flag(p, "inference actors")
    p.add_argument("--actors", type=int, default=None, help="inference actors (default: one per GPU, else 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per inference batch (default: 64 on CPU actors, 256 on GPU actors)")
    p.add_argument("--baseline", action="store_true",
                   help="also score a randomly initialised backbone of the same architecture")
    p.add_argument("--parquet-image-column", default="image", help="Parquet column holding encoded images")
    add_s3_flags(p)
    return p


def actor_pool(use_gpu: bool | None, actors: int | None) -> ActorPool:
    """The inference actors on the connected cluster: one per GPU (else one), each with a share
    of the CPUs (1-4) that leaves one to the read tasks."""
    cluster = capacity()[0]
    gpu = place(cluster, 1, use_gpu).use_gpu
    n = actors or (max(1, int(cluster.get("GPU", 0))) if gpu else 1)
    placement = place(cluster, n, gpu, low=1.0, high=4.0)
    return ActorPool(n, placement.use_gpu, placement.cpus)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    options = s3_options(args)
    names = {f.name for f in fields(EvalRequest)}
    req = EvalRequest(**{k: v for k, v in vars(args).items() if k in names})

    def prepare():
        if args.actors is not None and args.actors < 1:
            raise UserError(f"--actors: must be >= 1, got {args.actors}")
        # --s3-anonymous is for a public dataset; the checkpoint is a run of the user's own,
        # read signed like every command's own files.
        ckpt = load_checkpoint(args.checkpoint, options.signed())
        return ckpt, open_sources(req, options)

    def execute(prepared) -> dict:
        ckpt, sources = prepared
        result = evaluate(req, ckpt, sources, actor_pool(gpu_choice(args.use_gpu), args.actors))
        print(format_table(result))
        return result

    return run_command(prog, prepare, execute, ray=True,
                       execute_errors=(UserError, ConfigError, EvalError, DataError, ValueError))
