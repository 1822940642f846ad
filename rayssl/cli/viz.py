"""``rayssl viz`` / ``python -m rayssl.viz``: draw a run's pictures as PNG files (``rayssl.viz.pictures``).

    python -m rayssl.viz curves        --run RUN_DIR --out curves.png
    python -m rayssl.viz prototypes    --checkpoint RUN_OR_CKPT [--data scenes|PATH] --out protos.png
    python -m rayssl.viz mls-positives --checkpoint RUN_OR_CKPT [--data scenes|PATH] --out positives.png
    python -m rayssl.viz cdul-labels   --checkpoint RUN_OR_CKPT [--pseudo-labels URI] --out labels.png

The last stdout line is a JSON summary of what was drawn.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from rayssl.cli.common import add_s3_flags, run_command, s3_options
from rayssl.outfile import check_writable
from rayssl.viz import pictures

PROG = "python -m rayssl.viz"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Draw a rayssl run's pictures (PNG).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="training curves from <run>/metrics.jsonl")
    c.add_argument("--run", required=True, help="run directory (--output of rayssl.train)")
    for name, helptext in (("prototypes", "SwAV prototype-usage histogram"),
                           ("mls-positives", "MLS queries and their top-k queue positives")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--checkpoint", required=True, help="checkpoint or run directory (local or s3://)")
        s.add_argument("--data", default="scenes", help="'scenes' (held-out built-in scenes) or a folder/prefix of images")
        s.add_argument("--seed", type=int, default=0, help="which images (default 0)")
        s.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's large-crop size")
        if name == "prototypes":
            s.add_argument("--num-images", type=int, default=1024, help="images assigned (default 1024)")
        else:
            s.add_argument("--queries", type=int, default=6, help="query rows (default 6)")
            s.add_argument("--gallery", type=int, default=512, help="images filling the queue (default 512)")
            s.add_argument("--k", type=int, default=None, help="positives shown (default: min(mls.k, 8))")
    s = sub.add_parser("cdul-labels", help="CDUL images with their top pseudo-labels before/after gradient alignment")
    s.add_argument("--checkpoint", required=True, help="CDUL checkpoint or run directory (local or s3://)")
    s.add_argument("--pseudo-labels", default=None, metavar="URI",
                   help="the `python -m rayssl.pseudolabel` output holding the labels before alignment "
                        "(default: the one the run recorded as cdul.pseudo_labels)")
    s.add_argument("--n", type=int, default=8, help="images shown (default 8)")
    s.add_argument("--top", type=int, default=3, help="labels listed per image (default 3)")
    s.add_argument("--select", choices=["changed", "random"], default="changed",
                   help="which images: 'changed' (default) the n whose soft labels moved most (sum over classes "
                        "of |after - before|; ties: lower image index), 'random' n drawn with --seed")
    s.add_argument("--seed", type=int, default=0, help="--select random: which images (default 0)")
    for s in sub.choices.values():
        s.add_argument("--out", required=True, help="PNG file to write (local or s3://)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        add_s3_flags(s, anonymous=False)
    return p


def draw(args: argparse.Namespace) -> dict:
    options = s3_options(args)
    if args.command == "curves":
        return pictures.draw_curves(args.run, args.out, options)
    if args.command == "cdul-labels":
        return pictures.draw_cdul_labels(args.checkpoint, args.out, pseudo_labels=args.pseudo_labels, n=args.n,
                                         top=args.top, select=args.select, seed=args.seed, options=options)
    common = {"data": args.data, "seed": args.seed, "image_size": args.image_size, "options": options}
    if args.command == "prototypes":
        return pictures.draw_prototypes(args.checkpoint, args.out, num_images=args.num_images, **common)
    return pictures.draw_mls_positives(args.checkpoint, args.out, queries=args.queries, gallery=args.gallery,
                                       k=args.k, **common)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def prepare() -> dict:  # the picture is drawn here: every failure is the input's (exit code 2)
        check_writable(args.out, "--out", overwrite=args.overwrite, options=s3_options(args))
        return draw(args)

    return run_command(prog, prepare, lambda summary: summary)
