"""A Ray Tune sweep in which every trial is a full TorchTrainer run (``python -m tuning.sweep``).

The Ray 2.60 pattern (Train V2): a Tune *function* per trial builds the trial's config,
then fits a ``TorchTrainer`` through ``rayssl.runtime.driver.train`` with ``TuneReportCallback``,
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
before Ray starts, by the command (``rayssl.cli.sweep``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from rayssl.config import Config, ConfigError, deep_merge
from rayssl.data.pipeline import shard_images
from rayssl.data.sources import Source
from rayssl.engine.monitor import log
from rayssl.eval.evaluate import run_metric
from rayssl.methods import get_method
from rayssl.runtime.cluster import capacity, check_output_shared, cpu_share
from rayssl.runtime.driver import checkpoint_uri, train
from rayssl.storage import S3Options, exists, read_text, run_location, write_text
from tuning.spaces import describe, nest, space_to_jsonable, to_tune

# The Tune function only drives its trial's TorchTrainer: a quarter CPU is plenty.
TRIAL_DRIVER_CPU = 0.25
# Ray Data's map tasks take one CPU each: every running trial keeps one for its pipeline.
DATA_CPU = 1.0
SPEC_FILE = "sweep.json"


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
    if num_workers < 1:
        raise ConfigError("--num-workers: a sweep's trials train on Ray Train workers (1 or more); "
                          "0, training in this process, is for a single run")
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    gpu = use_gpu if use_gpu is not None else gpus >= 1
    if gpu and gpus < num_workers:
        raise ConfigError(f"--num-workers: each trial needs {num_workers} GPUs, the Ray cluster has {gpus:g}")
    if cpus_per_worker is None:  # the placement rule, with the trial's own driver beside Ray Data's CPU
        cpus_per_worker = cpu_share(cpus, num_workers, reserved=TRIAL_DRIVER_CPU + DATA_CPU, low=0.05)
    per_trial = TRIAL_DRIVER_CPU + num_workers * cpus_per_worker + DATA_CPU
    derived = max(1, int(cpus // per_trial))
    if gpu:
        derived = min(derived, int(gpus // num_workers))
    concurrent = max_concurrent if max_concurrent is not None else derived
    return max(1, min(concurrent, num_samples)), cpus_per_worker


# --------------------------------------------------------------------------- the trial


class EpochReports(TuneReportCallback):
    """Forwards the reports of whole epochs to Tune: a checkpoint written inside an epoch
    (``run.checkpoint_every_steps``, a preemption) is reported without an ``epoch`` and without
    the metric, which the scheduler (ASHA, by epoch) must not see."""

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and "epoch" in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def train_trial(config: dict, base: dict, output: str, cpus_per_worker: float, source: Source | None = None) -> None:
    """The Tune function: one trial = one rayssl run under ``<output>/trials/<trial id>``.

    Runs in a Tune actor. A trial restarted by a resumed sweep finds its run directory and
    continues from the newest complete checkpoint (same Ray Train storage path and name).
    ``source``: the sweep's listing of ``data.source``, read by every trial (a bucket's listing
    can take minutes; each trial listing it again would add that to every trial).
    """
    raw = deep_merge(base, nest(config))
    trial_out = f"{output.rstrip('/')}/trials/{tune.get_context().get_trial_id()}"
    run = raw.setdefault("run", {})
    run["output"] = trial_out
    if run.get("cpus_per_worker") is None:
        run["cpus_per_worker"] = cpus_per_worker
    # ASHA compares trials at a rung by that epoch's score: evaluate on rank 0, between epochs
    raw.setdefault("eval", {})["where"] = "rank0"
    cfg = Config.from_dict(raw)  # the sweep's config: its storage options travel with it
    cfg.run.resume = exists(f"{trial_out}/config.yaml", cfg.data.s3.signed())
    train(cfg, callbacks=[EpochReports()], source=source if source is not None and source.uri == cfg.data.source
          else None)  # (a space that sweeps data.source lists each trial's own)


# --------------------------------------------------------------------------- results


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def collect_results(grid, metric: str, epochs: int, output: str, keys: Sequence[str],
                    options: S3Options | None = None) -> dict:
    """Tune's ResultGrid -> the sweep's results dict (trials table + best trial).

    FINISHED: the trial reported its last epoch and wrote its summary. One that reported its
    last epoch but has no summary was stopped there by the scheduler (ASHA can stop a trial at
    its last report when a rung it passed unrecorded, e.g. across a resume, judges it weak):
    STOPPED, like any trial stopped early.
    """
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        df = r.metrics_dataframe
        ckpt = None
        if df is not None and "checkpoint_path" in df:
            paths = df["checkpoint_path"].dropna()
            if len(paths):
                ckpt = checkpoint_uri(str(paths.iloc[-1]), output)
        done = m.get("epoch")
        trial = m.get("trial_id") or Path(str(r.path)).name
        finished = done == epochs and exists(f"{output.rstrip('/')}/trials/{trial}/summary.json", options)
        status = "ERROR" if r.error else ("FINISHED" if finished else ("STOPPED" if done else "PENDING"))
        row = {
            "trial": trial,
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
    if results.get("eval_data"):
        lines.append(f"{metric} measured on: {results['eval_data']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepPlan:
    """What the command asked of the sweep, besides the trials' config."""

    num_samples: int = 8
    scheduler: str = "asha"  # asha | none
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    max_concurrent: int | None = None  # None: as many as the cluster holds (plan_trials)


def sweep_spec(cfg: Config, base: dict, space: dict, plan: SweepPlan) -> dict:
    """What identifies a sweep in its ``sweep.json`` (a restart with other options is refused)."""
    spec = {"method": cfg.run.method, "num_samples": plan.num_samples, "scheduler": plan.scheduler,
            "grace_period": plan.grace_period, "space": space_to_jsonable(space), "base": base}
    return json.loads(json.dumps(spec))  # tuples -> lists, as read back from the file


def run_sweep(plan: SweepPlan, cfg: Config, base: dict, space: dict, source: Source | None = None) -> dict:
    """Run (or resume) the sweep on the connected Ray; writes and returns its results. ``source``:
    ``data.source`` as the command listed it (None: the built-in scenes, or listed by each trial)."""
    out = cfg.run.output
    options = cfg.data.s3.signed()  # the sweep's own files
    resources, num_nodes = capacity()
    # Tune's state and every trial's checkpoints live under the output.
    check_output_shared(out, cfg.run.shared_output, num_nodes)
    concurrent, cpw = plan_trials(resources, cfg.run.num_workers, cfg.run.use_gpu,
                                  cfg.run.cpus_per_worker, plan.num_samples, plan.max_concurrent)
    spec = sweep_spec(cfg, base, space, plan)
    spec_uri = f"{out}/{SPEC_FILE}"
    resuming = exists(spec_uri, options)
    if resuming:
        stored = json.loads(read_text(spec_uri, options))
        differ = [k for k in spec if stored.get(k) != spec[k]]
        if differ:
            raise ConfigError(f"--output: {out} holds a different sweep (differs in: {', '.join(differ)}); "
                              "start it again with its own options to resume it, or choose another --output")
    else:
        write_text(spec_uri, json.dumps(spec, indent=2), options)
    metric = run_metric(cfg.eval, get_method(cfg.run.method).metric)  # eval.protocol resolved by the command
    if source is not None and not cfg.method.indexed_data():
        shard_images(cfg.data, source, announce=log)  # shards counted once here, for every trial
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, output=out, cpus_per_worker=cpw, source=source),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    storage_path, name, fs = run_location(f"{out}/tune", options)
    tune_path = f"{storage_path}/{name}"
    if resuming and tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        log(f"sweep: resuming {out} (finished trials are kept, unfinished ones continue from their checkpoints)")
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        log(f"sweep: {plan.num_samples} trials of {cfg.run.method}, {concurrent} at a time "
            f"({cfg.run.num_workers} workers x {cpw:g} CPU each), scheduler {plan.scheduler}, output {out}\n"
            f"{describe(space)}")
        scheduler = None
        if plan.scheduler == "asha":
            # stop_last_trials=False: a trial that reaches the last epoch ends by itself and
            # writes its summary, instead of being stopped at its final report.
            scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.run.epochs, grace_period=plan.grace_period,
                                      reduction_factor=2, stop_last_trials=False)
        tuner = tune.Tuner(
            trainable,
            param_space={k: to_tune(v) for k, v in space.items()},
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=plan.num_samples,
                                        scheduler=scheduler, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs, verbose=1),
        )
    grid = tuner.fit()
    results = collect_results(grid, metric, cfg.run.epochs, out, list(space), options)
    results["eval_data"] = cfg.eval.data or "scenes"  # what the metric was measured on
    write_text(f"{out}/results.json", json.dumps(results, indent=2), options)
    write_text(f"{out}/results.txt", format_table(results) + "\n", options)
    return results
