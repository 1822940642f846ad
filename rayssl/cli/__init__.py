"""The command line: the only code that parses argv or prints for a human.

``rayssl <command> [options]`` (the console script, or ``python -m rayssl <command>``) runs one
of ``COMMANDS``; each is also reachable by its own module (``python -m rayssl.train`` ...).
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> (module of rayssl.cli, the documented `python -m` form, one line of help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("train", "python -m rayssl.train", "pretrain a backbone on Ray Train"),
    "sweep": ("sweep", "python -m tuning.sweep", "sweep hyperparameters with Ray Tune"),
    "eval": ("eval", "python -m rayssl.eval", "kNN / linear probe of a checkpoint's frozen backbone"),
    "export": ("export", "python -m rayssl.export", "the backbone for torchvision / timm / detectron2"),
    "viz": ("viz", "python -m rayssl.viz", "pictures: curves, prototypes, MLS positives, CDUL labels"),
    "label": ("label", "python -m rayssl.pseudolabel", "CDUL stage 1: CLIP pseudo-labels as a Ray Data job"),
    "tiny-clip": ("tiny_clip", "python -m rayssl tiny-clip", "train the offline stand-in CLIP on scenes"),
    "shards": ("shards", "python -m rayssl.data.shards", "write webdataset / Parquet shards on Ray"),
    "scenes": ("scenes", "python -m rayssl.data.scenes", "write the built-in scenes as image files"),
    "bench": ("bench", "python -m rayssl.bench", "step / pipeline / communication / ingest benchmark"),
    "gpu-check": ("gpu_check", "python -m rayssl gpu-check", "the GPU check: step, pipeline, quality in one JSON"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rayssl <command> [options]   (rayssl <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rayssl: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"rayssl.cli.{COMMANDS[name][0]}")
    return module.main(rest, prog=f"rayssl {name}")
