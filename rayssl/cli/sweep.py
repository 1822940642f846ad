"""``rayssl sweep`` / ``python -m tuning.sweep``: a Ray Tune sweep of full training runs.

Every option of ``rayssl train`` (``--method``, ``--data``, ``--epochs``, ``--set`` ...) goes to
every trial. The search space (the method's default, or ``--search-space FILE.yaml`` over it),
the trials' config and every corner of the space are checked before Ray starts; the sweep
itself is ``tuning.runner``. Started again with the same ``--output``, a sweep resumes.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

from rayssl.cli.common import run_command
from rayssl.cli.train import build_parser as train_parser
from rayssl.cli.train import check_data_source, check_eval_source, name_flag, resolve_config
from rayssl.config import Config, ConfigError
from rayssl.eval.evaluate import run_metric
from rayssl.methods import get_method
from tuning.spaces import default_space, describe, load_space_file, validate_space

PROG = "python -m tuning.sweep"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Sweep hyperparameters with Ray Tune; each trial is a full rayssl TorchTrainer run "
            "reporting the method's evaluation metric every epoch. Any option of "
            "`python -m rayssl.train` (--method, --data, --epochs, --batch-size, --num-workers, "
            "--config, --set ...) is passed through to every trial."
        ),
        epilog="Started again with the same --output, an interrupted sweep resumes. "
               "`python -m rayssl.train --help` lists the options passed through to the trials.",
    )
    p.add_argument("--num-samples", type=int, default=8, help="number of trials (default 8)")
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                   help="asha: stop weak trials early on the per-epoch metric; none: run every trial to the end")
    p.add_argument("--grace-period", type=int, default=1, metavar="EPOCHS",
                   help="ASHA: epochs every trial runs before it can be stopped (default 1)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once; default: as many as the cluster's CPUs/GPUs hold without "
                        "starving each other or Ray Data")
    p.add_argument("--output", default=None,
                   help="directory or s3:// URI for the sweep (default ./runs/sweep-<method>-<timestamp>)")
    p.add_argument("--search-space", default=None, metavar="FILE.yaml",
                   help="YAML file of dimensions replacing the method's defaults (see tuning/spaces.py)")
    p.add_argument("--print-space", action="store_true",
                   help="print the validated search space and exit without starting Ray")
    return p


def prepare_sweep(argv: Sequence[str] | None, prog: str = PROG):
    """Parse and validate everything; nothing here starts Ray. Returns (plan, cfg, base, space)."""
    from tuning.runner import SweepPlan

    args, rest = build_parser(prog).parse_known_args(argv)
    targs = train_parser(prog).parse_args(rest)
    if targs.resume:
        raise ConfigError("--resume: a sweep resumes by itself when started again with the same --output")
    if targs.print_config:
        raise ConfigError("--print-config: not a sweep option; use --print-space")
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--grace-period", args.grace_period, 1),
                             ("--max-concurrent", args.max_concurrent, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag}: must be >= {low}, got {value}")
    cfg = resolve_config(targs)
    if not cfg.data.builtin_scenes and not cfg.eval.data:
        raise ConfigError(f"--eval-data: a sweep ranks and stops trials by an evaluation on labelled images, and "
                          f"scores on the built-in scenes say nothing about models of {cfg.data.source}; add "
                          "--eval-data (labelled images of yours: an ImageFolder, or images with --eval-labels)")
    check_eval_source(cfg)  # resolves eval.protocol, hence the metric
    metric = run_metric(cfg.eval, get_method(cfg.run.method).metric)
    if cfg.eval.num_test_images < 1 and not cfg.eval.data:
        raise ConfigError(f"eval.num_test_images: a sweep ranks trials by {metric} on held-out images; must be >= 1")
    if cfg.eval.every_epochs not in (0, 1):
        raise ConfigError(f"eval.every_epochs: a sweep reports {metric} to Tune every epoch; leave it at 0 or 1, "
                          f"got {cfg.eval.every_epochs}")
    cfg.eval.every_epochs = 1
    if args.grace_period > cfg.run.epochs and args.scheduler == "asha":
        raise ConfigError(f"--grace-period: {args.grace_period} epochs exceeds --epochs {cfg.run.epochs}")
    cfg.run.output = (args.output or str(Path("runs") / f"sweep-{cfg.run.method}-"
                                         f"{datetime.now().strftime('%Y%m%d-%H%M%S')}")).rstrip("/")
    base = cfg.to_dict()
    base["run"]["output"] = ""
    space = default_space(cfg.run.method)
    if args.search_space:
        space.update(load_space_file(args.search_space))
    validate_space(space, base, f"--search-space {args.search_space}: " if args.search_space else "search space: ")
    plan = SweepPlan(args.num_samples, args.scheduler, args.grace_period, args.max_concurrent)
    return plan, cfg, base, space, args.print_space


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    def prepare():
        try:
            plan, cfg, base, space, print_space = prepare_sweep(argv, prog)
            if print_space:
                print(describe(space))
                return None
            source = check_data_source(cfg)  # listed once: every trial reads this listing
        except ConfigError as exc:
            raise ConfigError(name_flag(str(exc))) from None
        return plan, cfg, base, space, source

    def execute(prepared: tuple[object, Config, dict, dict, object]) -> dict:
        from tuning.runner import format_table, run_sweep

        try:
            results = run_sweep(*prepared)
        except ConfigError as exc:
            raise ConfigError(name_flag(str(exc))) from None
        print(format_table(results), file=sys.stderr)
        return results

    def hint(prepared, what: str) -> str:
        return f"run the same command again (same --output {prepared[1].run.output}) to resume"

    return run_command(prog, prepare, execute, ray=True, hint=hint)
