"""``rayssl label`` / ``python -m rayssl.pseudolabel``: CDUL's CLIP pseudo-labelling job (stage 1).

    python -m rayssl.pseudolabel --data scenes|FOLDER|s3://bucket/prefix|SHARDS.tar --classes FILE_OR_LIST \\
        --clip-model NAME --clip-pretrained TAG_OR_PATH --out DIR_OR_URI [--grid 3] [--gamma 0] ...

Writes Parquet + ``pseudolabels.json`` + ``summary.json`` to ``--out`` and prints the summary
as the last line of stdout (JSON). The job itself: ``rayssl.pseudolabel.job``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from rayssl.cli.common import UserError, add_gpu_flag, add_s3_flags, gpu_choice, run_command, s3_options
from rayssl.data.pseudo_labels import meta_path
from rayssl.data.scenes import SHAPES
from rayssl.data.labels import load_labels, own_folder_labels
from rayssl.data.sources import DataError, resolve_source
from rayssl.pseudolabel.clip import check_clip_args
from rayssl.pseudolabel.job import LabelJob, run_job
from rayssl.pseudolabel.labels import class_prompts
from rayssl.runtime.cluster import capacity, place
from rayssl.storage import exists

PROG = "python -m rayssl.pseudolabel"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="CDUL stage 1: CLIP global-local pseudo-labels as a Ray Data job.")
    p.add_argument("--data", required=True, help="'scenes' (built-in generated scenes), a folder or s3:// prefix of images, "
                   "or uncompressed webdataset .tar shards (a prefix or a brace pattern)")
    p.add_argument("--classes", default=None,
                   help="class names: a file (one per line, or a JSON list) or a comma-separated list; "
                        "default for --data scenes: the scene shapes")
    p.add_argument("--clip-model", required=True, help="open_clip model name (e.g. ViT-B-32, rayssl-tiny-clip)")
    p.add_argument("--clip-pretrained", required=True, help="open_clip hub tag (e.g. openai) or a checkpoint file")
    p.add_argument("--out", required=True, help="output folder or s3:// URI (must not hold a previous output)")
    p.add_argument("--template", default="a photo of a {}", help="prompt template with one {} (default: %(default)r)")
    p.add_argument("--grid", type=int, default=3, help="snippets per side (default 3: 3x3 snippets)")
    p.add_argument("--gamma", type=float, default=0.0, help="aggregation threshold: max if >= gamma else min (default 0)")
    p.add_argument("--lam", type=float, default=0.0, help="weight of |global - aggregated| in the initial label (default 0)")
    p.add_argument("--num-actors", type=int, default=2, help="CLIP actors (one GPU each when available; default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    add_gpu_flag(p, "CLIP actors")
    p.add_argument("--labels", default=None,
                   help="ground truth to score the labels with: a CSV/Parquet table (id -> classes) or an "
                        "ImageFolder tree, matched by file stem (--data's own class folders: by path); "
                        "read before the job")
    p.add_argument("--no-vectors", action="store_true", help="do not store the global and aggregated vectors")
    p.add_argument("--num-scenes", type=int, default=2048, help="--data scenes: how many (default 2048)")
    p.add_argument("--scenes-size", type=int, default=64, help="--data scenes: side in pixels (default 64)")
    p.add_argument("--scenes-split", default="train", help="--data scenes: stream (train, eval-train, eval-test)")
    p.add_argument("--seed", type=int, default=0, help="--data scenes: base seed (as rayssl.train's --seed)")
    p.add_argument("--max-bad-fraction", type=float, default=0.5,
                   help="stop when more than this fraction of images is unusable (default 0.5)")
    add_s3_flags(p)
    return p


def parse_classes(text: str | None, data: str) -> list[str]:
    """Class names from a file (lines or JSON list) or a comma-separated list; errors name --classes."""
    if text is None:
        if data == "scenes":
            return list(SHAPES)
        raise ValueError("--classes: required for your own data (a file of class names or a comma-separated list)")
    looks_like_file = os.sep in text or text.endswith((".txt", ".json", ".csv", ".names")) or os.path.exists(text)
    if looks_like_file:
        if not os.path.isfile(text):
            raise ValueError(f"--classes: class file not found: {text}")
        raw = open(text, encoding="utf-8").read()
        try:
            parsed = json.loads(raw)
            names = [str(c) for c in parsed] if isinstance(parsed, list) else None
        except json.JSONDecodeError:
            names = None
        if names is None:
            names = [line.strip() for line in raw.splitlines()]
        where = f"class file {text}"
    else:
        names = text.split(",")
        where = "the list"
    names = [n.strip() for n in names if n.strip() and not n.strip().startswith("#")]
    if not names:
        raise ValueError(f"--classes: {where} holds no class names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--classes: duplicate class names in {where}: {', '.join(dup)}")
    return names


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    options = s3_options(args)

    def prepare():
        classes = parse_classes(args.classes, args.data)
        for name in ("grid", "num_actors", "batch_size", "num_scenes"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        class_prompts(classes, args.template)
        check_clip_args(args.clip_model, args.clip_pretrained)  # ClipLoadError is a ValueError: exit code 2
        out = args.out.rstrip("/")
        if exists(meta_path(out), options.signed()) or exists(f"{out}/summary.json", options.signed()):
            raise UserError(f"--out: {args.out} already holds pseudo-labels; choose another --out (nothing was overwritten)")
        source = None
        if args.data != "scenes":
            source = resolve_source(args.data, options)
            if source.kind == "parquet":
                raise UserError(f"--data: {args.data} holds parquet shards; the labelling job reads image "
                                "files (a folder or prefix), uncompressed webdataset .tar shards or 'scenes' "
                                "(training re-reads each image by its address, and a Parquet row has none)")
        truth, truth_key = None, "id"
        try:  # read and checked now: ground truth that cannot score the labels fails before the job
            found = own_folder_labels(args.labels, args.data, source.paths, options) \
                if args.labels and source is not None and source.kind == "images" else None
            if found is not None:  # --data's own class folders, matched by path: file names may repeat
                truth, truth_key = {p: (cls,) for p, (_, cls) in found.items()}, "path"
            elif args.labels:
                truth = load_labels(args.labels, options.signed())
        except DataError as exc:
            raise UserError(f"--labels: {exc}") from None
        job = LabelJob(out=args.out, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                       template=args.template, grid=args.grid, gamma=args.gamma, lam=args.lam,
                       num_actors=args.num_actors, batch_size=args.batch_size, keep_vectors=not args.no_vectors,
                       truth=truth, truth_key=truth_key, num_scenes=args.num_scenes, scenes_size=args.scenes_size,
                       scenes_split=args.scenes_split, seed=args.seed, max_bad_fraction=args.max_bad_fraction,
                       options=options)
        return job, classes, source

    def execute(prepared) -> dict:
        job, classes, source = prepared
        placement = place(capacity()[0], job.num_actors, gpu_choice(args.use_gpu))
        return run_job(job, classes, source, placement.use_gpu, placement.cpus)

    return run_command(prog, prepare, execute, ray=True)
