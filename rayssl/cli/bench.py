"""``rayssl bench`` / ``python -m rayssl.bench``: throughput of the step, the pipeline and the collectives.

    python -m rayssl.bench [--method swav|mls|moco|cdul] [--preset cpu|gpu] [--device auto|cpu|cuda]
        [--batch-size B] [--steps N] [--warmup N] [--repeats N] [--augment-on cpu|device]
        [--data URI] [--s3-endpoint URL] [--skip step|pipeline|dataloader|comm ...] [--only PART] [--set section.key=value ...]

Prints a readable table and, as the last stdout line, one JSON object:

* ``step``: images/s of ``Engine.train_step`` (the worker's step) on synthetic crops already on
  the device (median of ``--repeats`` runs), split into backbone, heads, loss and optimiser,
  with the peak device memory;
* ``pipeline``: images/s of the same step fed by the real Ray Data pipeline from local JPEG
  shards the bench writes itself (or ``--data``), ``ratio`` = pipeline/step, and the
  pipeline's ingest rate alone;
* ``dataloader``: the same step fed by a ``torch.utils.data.DataLoader`` over the same files with
  the same crops (cores - 1 workers): the loop a user would otherwise write;
  ``pipeline_over_dataloader`` compares the two;
* ``comm``: bytes and time per step of the collectives the method adds, in
  ``--comm-workers`` gloo processes, next to the gradient all-reduce;
* ``--only ingest --data URI``: decoded + augmented samples/s out of the pipeline alone, and out
  of the DataLoader baseline alone (one worker per core) where it reads the source
  (``--skip dataloader``: the pipeline alone).

``--method cdul`` needs ``--set cdul.pseudo_labels=URI``; its step and comm parts take images of
that table by index, and its pipeline parts are skipped (CDUL trains on the images its table
lists, not on the bench's shards; a run's summary gives that pipeline's figures).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

import torch

from rayssl.bench.run import PARTS, BenchOptions, format_table, ingest_only_config, run_bench
from rayssl.cli.common import UserError, add_s3_flags, run_command, s3_data_overrides
from rayssl.methods import method_names

if TYPE_CHECKING:
    from rayssl.data.sources import Source

PROG = "python -m rayssl.bench"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Throughput benchmark: the training step alone, the step fed "
                                                       "by the real pipeline, and the per-step communication.")
    p.add_argument("--method", default="swav", choices=method_names(), help="the method whose step is measured")
    p.add_argument("--preset", choices=["cpu", "gpu"], default=None,
                   help="cpu (small) or gpu (ResNet-50, 2x224+6x96); default: gpu on CUDA, else cpu")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 2, or enough to fill the method's queue so the timed steps use it)")
    p.add_argument("--repeats", type=int, default=3, help="runs; figures are their median")
    p.add_argument("--split-steps", type=int, default=3, help="steps for the backbone/heads/loss/optimiser split")
    p.add_argument("--augment-on", choices=["cpu", "device"], default="cpu",
                   help="pipeline part: multi-crop in Ray Data (cpu) or on the training device (device)")
    p.add_argument("--data", default="", help="pipeline source (folder, s3:// prefix, shards); default: "
                                              "local JPEG shards written by the bench")
    add_s3_flags(p)
    p.add_argument("--num-images", type=int, default=0, help="images in the bench's own shards (default: enough)")
    p.add_argument("--ingest-seconds", type=float, default=5.0,
                   help="seconds of the pipeline's and the DataLoader's ingest alone, no step (0: skip)")
    p.add_argument("--consumers", type=int, default=1, help="--only ingest: parallel consumers, like workers")
    p.add_argument("--comm-workers", type=int, default=2, help="processes for the communication measurement")
    p.add_argument("--comm-batch", type=int, default=8, help="per-worker batch of the communication measurement")
    p.add_argument("--comm-steps", type=int, default=3, help="measured steps of the communication measurement")
    p.add_argument("--skip", action="append", default=[], choices=["step", "pipeline", "dataloader", "comm"])
    p.add_argument("--only", choices=PARTS, default=None, help="measure one part only (ingest: the pipeline "
                                                                "and the DataLoader alone on --data)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p


def options_from(args: argparse.Namespace) -> BenchOptions:
    for name in ("steps", "repeats", "split_steps", "comm_workers", "comm_batch", "comm_steps", "consumers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.device != "auto" and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available")
    ingest_without_dataloader = args.only == "ingest" and args.skip == ["dataloader"]
    if args.only and args.skip and not ingest_without_dataloader:
        raise UserError("--only and --skip: give one of them (or --only ingest --skip dataloader: Ray Data alone)")
    if args.only == "ingest" and not args.data:
        raise UserError("--only ingest: needs --data (the pipeline's source)")
    parts = (args.only,) if args.only else tuple(p for p in ("step", "pipeline", "dataloader", "comm")
                                                         if p not in args.skip)
    return BenchOptions(
        method=args.method, preset=args.preset, device=args.device, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, repeats=args.repeats, split_steps=args.split_steps, augment_on=args.augment_on,
        data=args.data, data_options=s3_data_overrides(args), num_images=args.num_images,
        ingest_seconds=args.ingest_seconds, dataloader_ingest=not ingest_without_dataloader,
        consumers=args.consumers, comm_workers=args.comm_workers,
        comm_batch=args.comm_batch, comm_steps=args.comm_steps, parts=parts, sets=tuple(args.set))


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def prepare() -> tuple[BenchOptions, Source | None]:
        opts = options_from(args)
        source = None
        if opts.parts == ("ingest",):  # check the source before Ray starts; the bench reads this listing
            from rayssl.data.pipeline import data_listing

            source = data_listing(ingest_only_config(opts).data)
        else:
            from rayssl.bench.config import bench_config

            bench_config(opts.method, opts.preset or "cpu", opts.batch_size, opts.sets, opts.augment_on)
        return opts, source

    def execute(prepared: tuple[BenchOptions, Source | None]) -> dict:
        result = run_bench(*prepared)
        print(format_table(result))
        return result

    return run_command(prog, prepare, execute,
                       exit_code=lambda r: 1 if "error" in r.get("ingest", {}) else 0)
