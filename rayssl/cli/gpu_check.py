"""``rayssl gpu-check`` (``experiments/gpu_check.sh``): the GPU figures in one command, one JSON file.

    python -m rayssl gpu-check [--out FILE] [--budget-s 480] [--quality-s 120] [--skip PART ...] [--dry-run]

On a GPU machine with the project installed: SwAV's ResNet-50 step (2x224 + 6x96, batch 64,
bf16, channels_last; compile off and on), the pipeline with augment_on cpu and device, ViT-S/16,
and a quality run on the scenes (kNN against random init), within the budget; see
``rayssl.bench.gpu_check``. ``--dry-run``: the same parts at tiny sizes on the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Sequence

import torch

from rayssl.bench.gpu_check import PARTS, CheckOptions, run_gpu_check
from rayssl.cli.common import UserError, run_command
from rayssl.engine import log
from rayssl.outfile import check_writable

PROG = "python -m rayssl gpu-check"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="The GPU check: step, pipeline and quality figures of SwAV "
                                                       "on one GPU, within a time budget, written to one JSON file.")
    p.add_argument("--out", default="", help="the JSON file (default gpu-check-<UTC time>.json here; an existing "
                                             "file is refused)")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N (cpu only with --dry-run)")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time; parts that would pass "
                                                                "it are skipped and say so")
    p.add_argument("--quality-s", type=float, default=120.0, help="training time of the quality run")
    p.add_argument("--batch-size", type=int, default=64, help="images per step on the GPU")
    skippable = [x for x in PARTS if x != "step"]  # the step: what the others are read against
    p.add_argument("--skip", action="append", default=[], choices=skippable, metavar="PART",
                   help="leave a part out, e.g. one an earlier check measured, so that the others fit the budget "
                        "(repeatable): " + ", ".join(skippable))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    return p


def options_from(args: argparse.Namespace) -> CheckOptions:
    device = "cpu" if args.dry_run else args.device
    if not args.dry_run:
        if not device.startswith("cuda"):
            raise UserError(f"--device {device}: the check measures a GPU; --dry-run runs it on the CPU")
        if not torch.cuda.is_available():
            raise UserError("no CUDA device is available: run it on a GPU machine, or --dry-run to check the script "
                            "on this one")
    for name in ("budget_s", "quality_s"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    out = args.out or f"gpu-check-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}.json"
    check_writable(out, "--out")
    return CheckOptions(out=out, device=device, dry_run=args.dry_run, budget_s=args.budget_s,
                        quality_s=args.quality_s, batch_size=args.batch_size, skip=tuple(args.skip))


def summary_lines(r: dict) -> list[str]:
    lines = [f"gpu check on {r['device_name']} (torch {r['torch']}), {r['wall_s']} s -> written"]
    for name, p in r["parts"].items():
        if "skipped" in p or "error" in p:
            lines.append(f"  {name:<16} {p.get('skipped') or p.get('error')}")
        elif name == "quality":
            lines.append(f"  {name:<16} {p['steps']} steps in {p['train_s']} s: {p['metric']} {p[p['metric']]:.3f} "
                         f"against {p[p['metric'] + '_random_init']:.3f} at random init")
            if "probes" in p:
                rows = p["probes"]["probes"]
                lines.append(f"  {'':<16} probes, trained / random init: " + ", ".join(
                    f"{a} {rows['trained'][a]:.3f} / {rows['random init'][a]:.3f}" for a in rows["trained"]))
        elif name == "device_fed":
            lines.append(f"  {name:<16} {p['images_per_s']} img/s fed by {p['decode']} decode + crop on the device "
                         f"(/step {p['ratio']}; {p['decode_crop_ms_per_batch']} ms per batch)")
        elif "pipeline" in p:
            lines.append(f"  {name:<16} pipeline {p['pipeline'].get('images_per_s')} img/s (/step "
                         f"{p['pipeline'].get('ratio')})"
                         + (f", DataLoader {p['dataloader'].get('images_per_s')} img/s" if "dataloader" in p else ""))
        else:
            lines.append(f"  {name:<16} {p['images_per_s']} img/s ({p['backbone']}, batch {p['batch_size']}, "
                         f"peak {p['peak_memory_mb']:.0f} MiB)")
    for goal, g in r["goals"].items():
        lines.append(f"  goal {goal}: {g['measured']} against {g['goal']} -> "
                     + ("n/a" if g["met"] is None else "met" if g["met"] else "NOT met")
                     + (f" (from {g['from']})" if g.get("from") else ""))
    return lines


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def execute(opts: CheckOptions) -> dict:
        result = run_gpu_check(opts, log=log)
        lines = summary_lines(result)
        lines[0] += f" {opts.out}"
        print("\n".join(lines), file=sys.stderr)
        return {"out": opts.out, "goals": result["goals"], "wall_s": result["wall_s"],
                "errors": sorted(k for k, p in result["parts"].items() if "error" in p)}

    return run_command(prog, lambda: options_from(args), execute,
                       exit_code=lambda r: 1 if r["errors"] else 0)
