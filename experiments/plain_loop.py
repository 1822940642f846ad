"""The plain PyTorch loop a user would write instead of ``python -m rayssl.train``, on the same cores.

The default run's config (SwAV, the built-in scenes, its epochs, batch and crops), trained in one
process by the same step (``Engine.train_step``) fed by a ``torch.utils.data.DataLoader``
(cores - 1 workers) that generates and multi-crops the scenes with the functions Ray Data's tasks
run (``--pregenerate``: generated once, before the loop), then scored by the
same evaluation (kNN against the random init): ``rayssl.bench.quality.quality_run`` with the
epochs fixed. No Ray, no workers, no checkpoints. Prints one JSON line: the training images/s
(first batch included) and the wall time from the command's start (imports included), to put
beside ``python -m rayssl.train``'s summary.

    python experiments/plain_loop.py [--epochs N] [--workers W] [--pregenerate] [--set section.key=value ...]
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before the imports, as a command's wall time counts them

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

from rayssl.bench.quality import quality_run  # noqa: E402
from rayssl.config import deep_merge, parse_assignment  # noqa: E402
from rayssl.presets import layered_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=0, help="default: the default run's")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default cores - 1)")
    p.add_argument("--pregenerate", action="store_true", help="generate the scenes once, not every epoch")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args()
    overrides: dict = {}
    for s in args.set:
        overrides = deep_merge(overrides, parse_assignment(s))
    if args.epochs:
        overrides = deep_merge(overrides, {"run": {"epochs": args.epochs}})
    cfg = layered_config(overrides)
    r = quality_run(cfg, torch.device("cpu"), seconds=None, workers=args.workers, pregenerate=args.pregenerate)
    r["torch_threads"] = torch.get_num_threads()
    r["wall_s"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
