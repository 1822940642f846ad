"""``python -m tuning.sweep``: a Ray Tune sweep in which every trial is a full TorchTrainer run.

The Ray 2.60 pattern (Train V2): a Tune *function* per trial builds the trial's config,
then fits a ``TorchTrainer`` through ``rayssl.train.run`` with ``TuneReportCallback``,
which forwards rank 0's per-epoch metrics (loss, the method's evaluation metric) to Tune.
ASHA compares trials on that metric every epoch and stops the weak ones early.

Layout of ``--output``::

    sweep.json        what was asked (method, base config, space, samples, scheduler)
    tune/             Ray Tune's experiment state (what a restart restores)
    trials/<id>/      one rayssl run per trial: config.yaml, checkpoint_*/, summary.json
    results.json      the trials table and the best trial's checkpoint URI
    results.txt       the same as text

Started again with the same ``--output`` (after Ctrl-C, a lost driver...), the sweep
resumes: finished trials are kept, unfinished ones continue from their last checkpoint.
Everything a user can get wrong (search-space keys and ranges, train options) is refused
before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from rayssl import train
from rayssl.config import Config, ConfigError, deep_merge
from rayssl.methods import get_method
from tuning.spaces import (
    default_space,
    describe,
    load_space_file,
    nest,
    space_to_jsonable,
    validate_space,
)

# The Tune function only drives its trial's TorchTrainer: a quarter CPU is plenty.
TRIAL_DRIVER_CPU = 0.25
# Ray Data's map tasks take one CPU each: every running trial keeps one for its pipeline.
DATA_CPU = 1.0
SPEC_FILE = "sweep.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tuning.sweep",
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


# --------------------------------------------------------------------------- resources


def plan_trials(cluster: Mapping[str, float], num_workers: int, use_gpu: bool | None,
                cpus_per_worker: float | None, num_samples: int,
                max_concurrent: int | None = None) -> tuple[int, float]:
    """``(max_concurrent_trials, cpus_per_worker)`` for a cluster's resources.

    A running trial holds its Tune function (TRIAL_DRIVER_CPU), ``num_workers`` training
    workers and one CPU for its Ray Data tasks; with GPUs, one GPU per worker. Workers get
    a whole CPU when the cluster has room for one trial that way, else an equal share of
    what is left. As many trials run at once as fit (at least one), capped by the samples.
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    gpu = use_gpu if use_gpu is not None else gpus >= 1
    if gpu and gpus < num_workers:
        raise ConfigError(f"--num-workers: each trial needs {num_workers} GPUs, the Ray cluster has {gpus:g}")
    if cpus_per_worker is None:
        whole = TRIAL_DRIVER_CPU + num_workers + DATA_CPU
        spare = cpus - TRIAL_DRIVER_CPU - DATA_CPU
        cpus_per_worker = 1.0 if cpus >= whole else max(0.05, math.floor(20 * spare / num_workers) / 20)
    per_trial = TRIAL_DRIVER_CPU + num_workers * cpus_per_worker + DATA_CPU
    derived = max(1, int(cpus // per_trial))
    if gpu:
        derived = min(derived, int(gpus // num_workers))
    concurrent = max_concurrent if max_concurrent is not None else derived
    return max(1, min(concurrent, num_samples)), cpus_per_worker


# --------------------------------------------------------------------------- the trial


def train_trial(config: dict, base: dict, output: str, cpus_per_worker: float) -> None:
    """The Tune function: one trial = one rayssl run under ``<output>/trials/<trial id>``.

    Runs in a Tune actor. A trial restarted by a resumed sweep finds its run directory and
    continues from the newest complete checkpoint (same Ray Train storage path and name).
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayssl.storage import S3Options, configure_s3, exists

    raw = deep_merge(base, nest(config))
    trial_out = f"{output.rstrip('/')}/trials/{tune.get_context().get_trial_id()}"
    run = raw.setdefault("run", {})
    run["output"] = trial_out
    if run.get("cpus_per_worker") is None:
        run["cpus_per_worker"] = cpus_per_worker
    cfg = Config.from_dict(raw)
    configure_s3(S3Options.from_config(cfg))
    cfg.run.resume = exists(f"{trial_out}/config.yaml")
    train.run(cfg, callbacks=[TuneReportCallback()])


# --------------------------------------------------------------------------- results


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def collect_results(grid, metric: str, epochs: int, output: str, keys: Sequence[str]) -> dict:
    """Tune's ResultGrid -> the sweep's results dict (trials table + best trial)."""
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        df = r.metrics_dataframe
        ckpt = None
        if df is not None and "checkpoint_path" in df:
            paths = df["checkpoint_path"].dropna()
            if len(paths):
                ckpt = train.checkpoint_uri(str(paths.iloc[-1]), output)
        done = m.get("epoch")
        status = "ERROR" if r.error else ("FINISHED" if done == epochs else ("STOPPED" if done else "PENDING"))
        row = {
            "trial": m.get("trial_id") or Path(str(r.path)).name,
            "status": status,
            "epochs": done,
            metric: _num(m.get(metric)),
            "loss": _num(m.get("loss")),
            "params": {k: (r.config or {}).get(k) for k in keys},
            "checkpoint": ckpt,
        }
        if r.error:
            row["error"] = str(r.error).strip().splitlines()[-1][:300]
        rows.append(row)
    rows.sort(key=lambda row: row["trial"])
    ranked = [row for row in rows if row[metric] is not None]
    best = max(ranked, key=lambda row: row[metric]) if ranked else None
    return {"metric": metric, "mode": "max", "output": output, "num_trials": len(rows),
            "best": best, "trials": rows}


def format_table(results: dict) -> str:
    metric = results["metric"]
    keys = list(results["trials"][0]["params"]) if results["trials"] else []
    head = ["trial", "status", "epochs", metric, "loss", *keys]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[r["trial"], r["status"], cell(r["epochs"]), cell(r[metric]), cell(r["loss"]),
             *(cell(r["params"][k]) for k in keys)] for r in results["trials"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *body]]
    best = results["best"]
    if best:
        lines.append(f"best: {best['trial']} {metric}={best[metric]:.4g} checkpoint: {best['checkpoint']}")
    else:
        lines.append(f"best: none (no trial reported {metric})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the sweep


def _spec(cfg: Config, base: dict, space: dict, args: argparse.Namespace) -> dict:
    spec = {"method": cfg.run.method, "num_samples": args.num_samples, "scheduler": args.scheduler,
            "grace_period": args.grace_period, "space": space_to_jsonable(space), "base": base}
    return json.loads(json.dumps(spec))  # tuples -> lists, as read back from the file


def prepare_sweep(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config, dict, dict]:
    """Parse and validate everything; nothing here starts Ray. Returns (args, cfg, base, space)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    tparser = train.build_parser()
    tparser.prog = parser.prog
    targs = tparser.parse_args(rest)
    if targs.resume:
        raise ConfigError("--resume: a sweep resumes by itself when started again with the same --output")
    if targs.print_config:
        raise ConfigError("--print-config: not a sweep option; use --print-space")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    if args.grace_period < 1:
        raise ConfigError(f"--grace-period: must be >= 1, got {args.grace_period}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
    cfg = train.resolve_config(targs)
    metric = get_method(cfg.run.method).metric
    if cfg.eval.num_test_images < 1:
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
    where = f"--search-space {args.search_space}: " if args.search_space else "search space: "
    validate_space(space, base, where)
    return args, cfg, base, space


def run_sweep(args: argparse.Namespace, cfg: Config, base: dict, space: dict) -> dict:
    ray = train.init_ray(cfg)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rayssl.loop import log
    from rayssl.storage import exists, read_text, run_location, write_text

    out = cfg.run.output
    capacity, num_nodes = train.cluster_capacity(ray)
    train.check_output_shared(cfg, num_nodes)  # Tune's state and every trial's checkpoints live there
    concurrent, cpw = plan_trials(capacity, cfg.run.num_workers, cfg.run.use_gpu,
                                  cfg.run.cpus_per_worker, args.num_samples, args.max_concurrent)
    spec = _spec(cfg, base, space, args)
    spec_uri = f"{out}/{SPEC_FILE}"
    resuming = exists(spec_uri)
    if resuming:
        stored = json.loads(read_text(spec_uri))
        differ = [k for k in spec if stored.get(k) != spec[k]]
        if differ:
            raise ConfigError(f"--output: {out} holds a different sweep (differs in: {', '.join(differ)}); "
                              "start it again with its own options to resume it, or choose another --output")
    else:
        write_text(spec_uri, json.dumps(spec, indent=2))
    metric = get_method(cfg.run.method).metric
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, output=out, cpus_per_worker=cpw),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    storage_path, name, fs = run_location(f"{out}/tune")
    tune_path = f"{storage_path}/{name}"
    if resuming and tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        log(f"sweep: resuming {out} (finished trials are kept, unfinished ones continue from their checkpoints)")
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        log(f"sweep: {args.num_samples} trials of {cfg.run.method}, {concurrent} at a time "
            f"({cfg.run.num_workers} workers x {cpw:g} CPU each), scheduler {args.scheduler}, output {out}\n"
            f"{describe(space)}")
        scheduler = None
        if args.scheduler == "asha":
            # stop_last_trials=False: a trial that reaches the last epoch ends by itself and
            # writes its summary, instead of being stopped at its final report.
            scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.run.epochs, grace_period=args.grace_period,
                                      reduction_factor=2, stop_last_trials=False)
        tuner = tune.Tuner(
            trainable,
            param_space={k: (v.to_tune() if hasattr(v, "to_tune") else v) for k, v in space.items()},
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=args.num_samples,
                                        scheduler=scheduler, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs, verbose=1),
        )
    grid = tuner.fit()
    results = collect_results(grid, metric, cfg.run.epochs, out, list(space))
    text = format_table(results)
    write_text(f"{out}/results.json", json.dumps(results, indent=2))
    write_text(f"{out}/results.txt", text + "\n")
    print(text, file=sys.stderr)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, cfg, base, space = prepare_sweep(argv)
        from rayssl.storage import S3Options, configure_s3

        configure_s3(S3Options.from_config(cfg))
        if args.print_space:
            print(describe(space))
            return 0
        train.check_data_source(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"python -m tuning.sweep: error: {train._name_flag(str(exc))}", file=sys.stderr)
        return 2
    started_ray = not train._ray_connected()
    try:
        results = run_sweep(args, cfg, base, space)
    except ConfigError as exc:
        print(f"python -m tuning.sweep: error: {train._name_flag(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again (same --output {cfg.run.output}) to resume",
              file=sys.stderr)
        return 130
    finally:
        if started_ray:
            train._shutdown_ray()
    sys.stdout.flush()
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
