"""MLS vs MoCo-v2 on the generated scenes: the paper's claim in miniature (issue 4).

Feeds docs/results/mls-claim.md.

    python experiments/mls_claim.py --work DIR [--seeds 0 1 2] [--epochs N] [--num-scenes N]
        [--batch-size N] [--num-workers 2] [--set SECTION.KEY=VALUE ...]

For each seed, pretrains ``--method moco`` and ``--method mls`` on the built-in scenes with
the quick preset and identical flags except the method (same seed, scenes, epochs, batch,
crops, optimiser, evaluation), each as its own ``python -m rayssl.train`` subprocess: a
fresh Ray, exactly the run a user gets. Each run's summary gives the linear-probe macro mAP
of the frozen backbone on held-out scenes (``linear_map``); the random-init backbone of the
same architecture on the same held-out scenes (``linear_map_random_init``) is taken from the
moco run's summary (computed here with ``evaluate_on_scenes`` when that run did not report
it; the mls run's figure, when present, is kept as a cross-check).

Runs go to DIR/seed<S>/<method> (stderr in DIR/seed<S>/<method>.log). Running again with the
same DIR resumes: finished runs (summary.json present) are read, not rerun; an interrupted
run (config.yaml, no summary.json) continues with ``--resume``. DIR/benchmark.json records
the settings; a DIR holding runs with other settings, or anything else, is refused. Seeds
may be added on a later call. DIR/results.json and DIR/results.md are rebuilt from the runs
of the seeds asked for. The table (seed x {random init, MoCo-v2, MLS, MLS - MoCo}, mean +-
sample std over seeds) is printed; the last line of stdout is a JSON summary (progress goes to
stderr). A failed run stops the benchmark with its stderr tail and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

METHODS = ("moco", "mls")
COLUMNS = ("random", "moco", "mls", "mls_minus_moco", "moco_minus_random", "mls_minus_random")
HEADERS = {"random": "random init", "moco": "MoCo-v2", "mls": "MLS", "mls_minus_moco": "MLS - MoCo"}
SETTINGS_FILE = "benchmark.json"
TAIL_LINES = 40


def _log(msg: str) -> None:
    print(f"[mls_claim] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- settings


def quick_defaults() -> dict:
    """The quick preset's budget: what ``python -m rayssl.train --method mls`` uses on the scenes."""
    from rayssl.presets import PRESETS

    q = PRESETS["quick"]
    return {"epochs": q["run"]["epochs"], "num_scenes": q["data"]["scenes_num_images"],
            "batch_size": q["run"]["batch_size"]}


def settings_from_args(args: argparse.Namespace) -> dict:
    d = quick_defaults()
    return {
        "preset": "quick",
        "epochs": args.epochs if args.epochs is not None else d["epochs"],
        "num_scenes": args.num_scenes if args.num_scenes is not None else d["num_scenes"],
        "batch_size": args.batch_size if args.batch_size is not None else d["batch_size"],
        "num_workers": args.num_workers,
        "set": list(args.set),
    }


def train_argv(method: str, seed: int, output: Path, settings: dict, resume: bool = False) -> list[str]:
    """The ``python -m rayssl.train`` command line of one run: only ``method`` and ``output``
    differ between the moco and mls runs of a seed."""
    argv = [sys.executable, "-m", "rayssl.train", "--method", method, "--data", "scenes",
            "--preset", settings["preset"], "--seed", str(seed), "--epochs", str(settings["epochs"]),
            "--batch-size", str(settings["batch_size"]), "--num-workers", str(settings["num_workers"]),
            "--set", f"data.scenes_num_images={settings['num_scenes']}"]
    for assignment in settings["set"]:
        argv += ["--set", assignment]
    argv += ["--output", str(output)]
    if resume:
        argv.append("--resume")
    return argv


def check_work_dir(work: Path, settings: dict) -> None:
    """Record ``settings`` in a new DIR; accept an existing DIR only with the same settings."""
    record = work / SETTINGS_FILE
    if record.exists():
        stored = json.loads(record.read_text())
        if stored != settings:
            diff = {k: (stored.get(k), settings.get(k)) for k in sorted(set(stored) | set(settings))
                    if stored.get(k) != settings.get(k)}
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise SystemExit(f"mls_claim: {work} holds runs made with other settings ({what}); "
                             "choose another --work (nothing was changed)")
        return
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"mls_claim: {work} is not empty and holds no {SETTINGS_FILE}; "
                         "choose another --work (nothing was changed)")
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=1))


# ----------------------------------------------------------------------------- runs


@dataclass
class Completed:
    returncode: int
    stdout: str
    wall_s: float


class RunFailed(Exception):
    def __init__(self, method: str, seed: int, returncode: int, log: Path, tail: str):
        super().__init__(f"{method} seed {seed} failed with exit status {returncode}")
        self.method, self.seed, self.returncode, self.log, self.tail = method, seed, returncode, log, tail


def subprocess_runner(argv: list[str], log: Path) -> Completed:
    """Run ``argv``: stdout captured, stderr (progress) appended to ``log``."""
    t0 = time.perf_counter()
    with open(log, "a") as err:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    return Completed(proc.returncode, proc.stdout, round(time.perf_counter() - t0, 1))


def run_state(output: Path) -> str:
    """``done`` (summary.json), ``partial`` (a started run: config.yaml only) or ``new``."""
    if (output / "summary.json").exists():
        return "done"
    if (output / "config.yaml").exists():
        return "partial"
    return "new"


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


Runner = Callable[[list[str], Path], Completed]  # (argv, stderr log) -> the finished process


def run_one(work: Path, seed: int, method: str, settings: dict, runner: Runner) -> dict:
    """One pretraining run's summary: read when finished in ``work``, else (re)run."""
    seed_dir = work / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    output, log = seed_dir / method, seed_dir / f"{method}.log"
    state = run_state(output)
    if state == "done":
        summary = json.loads((output / "summary.json").read_text())
        _log(f"seed {seed} {method}: finished earlier, read {output / 'summary.json'}")
    else:
        argv = train_argv(method, seed, output, settings, resume=state == "partial")
        _log(f"seed {seed} {method}: {'resuming' if state == 'partial' else 'running'}; progress in {log}")
        with open(log, "a") as f:
            f.write(f"[mls_claim] {' '.join(argv)}\n")
        done = runner(argv, log)
        if done.returncode != 0:
            raise RunFailed(method, seed, done.returncode, log, _tail(log))
        summary = _last_json(done.stdout)
        if summary is None and (output / "summary.json").exists():
            summary = json.loads((output / "summary.json").read_text())
        if summary is None:
            raise RunFailed(method, seed, done.returncode, log, "no JSON summary on stdout\n" + _tail(log))
        summary["benchmark_wall_s"] = done.wall_s
        _log(f"seed {seed} {method}: {summary.get('metric')} {summary.get(summary.get('metric', ''))} "
             f"in {done.wall_s:.0f} s")
    if summary.get("method") != method or summary.get(summary.get("metric", "")) is None:
        raise RunFailed(method, seed, 0, log, f"the summary of {output} has no score (was the evaluation off, "
                                              f"eval.num_test_images=0?): {json.dumps(summary)[:500]}")
    return summary


def random_init_in_process(run_dir: Path) -> float:
    """The random-init backbone's score for the run stored in ``run_dir``, computed as the training
    loop does: same seed, architecture, held-out scenes, crop size and metric."""
    import torch
    import yaml

    from rayssl.config import Config
    from rayssl.eval.features import evaluate_on_scenes, scenes_eval_sets
    from rayssl.methods import get_method
    from rayssl.modules.backbone import build_backbone

    cfg = Config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    metric = get_method(cfg.run.method).metric
    sets = scenes_eval_sets(cfg.run.seed, cfg.data.scenes_image_size, cfg.eval.num_train_images,
                            cfg.eval.num_test_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        net, _ = build_backbone(cfg.model.backbone, small_stem=cfg.model.small_stem)
    return float(evaluate_on_scenes(metric, net, sets, cfg.data.crop_sizes[0], torch.device("cpu"),
                                    cfg.eval.knn_k, cfg.eval.knn_temperature))


def random_init_for_seed(work: Path, seed: int, moco: dict, mls: dict,
                         compute: Callable[[Path], float]) -> float:
    key = f"{moco['metric']}_random_init"
    if moco.get(key) is not None:
        value = float(moco[key])
    else:
        cache = work / f"seed{seed}" / "random_init.json"
        if cache.exists():
            value = float(json.loads(cache.read_text())["value"])
        else:
            _log(f"seed {seed}: the moco summary has no {key}; evaluating a random-init backbone here")
            value = float(compute(work / f"seed{seed}" / "moco"))
            cache.write_text(json.dumps({"metric": moco["metric"], "value": value}))
    other = mls.get(f"{mls['metric']}_random_init")
    if other is not None and abs(float(other) - value) > 1e-4:
        _log(f"WARNING seed {seed}: random-init {moco['metric']} differs between the moco run ({value:.4f}) "
             f"and the mls run ({float(other):.4f}); the table uses the moco run's")
    return value


def multilabel_steps(run_dir: Path, summary: dict) -> int | None:
    """Training steps of an mls run in which its multi-label term was on (None: unknown).

    The term starts once the queue holds ``mls.queue_size`` keys; every step enqueues the
    global batch, so the first ``queue_size // batch_size`` steps are plain MoCo-v2. A budget
    shorter than that trains MLS and MoCo-v2 identically (same seed: the same numbers).
    """
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        queue, batch, lam = int(cfg["mls"]["queue_size"]), int(cfg["run"]["batch_size"]), float(cfg["mls"]["lam"])
        steps = int(summary["steps"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return max(0, steps - queue // batch) if lam > 0 else 0


# ----------------------------------------------------------------------------- table


def per_seed_row(seed: int, random: float, moco: float, mls: float) -> dict:
    return {"seed": seed, "random": random, "moco": moco, "mls": mls, "mls_minus_moco": mls - moco,
            "moco_minus_random": moco - random, "mls_minus_random": mls - random}


def aggregate(rows: Sequence[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; None for one seed) of every column over the seeds."""
    out = {}
    for col in COLUMNS:
        x = np.array([r[col] for r in rows], dtype=np.float64)
        out[col] = {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None, "n": len(x)}
    out["mls_wins"] = int(sum(r["mls"] > r["moco"] for r in rows))
    return out


def _cell(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def format_table(rows: Sequence[dict], agg: dict) -> str:
    cols = list(HEADERS)
    lines = ["| seed | " + " | ".join(HEADERS[c] for c in cols) + " |",
             "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(_cell(r[c], c == "mls_minus_moco") for c in cols) + " |")
    n = len(rows)
    cells = []
    for c in cols:
        a = agg[c]
        m = _cell(a["mean"], c == "mls_minus_moco")
        cells.append(m if a["std"] is None else f"{m} ± {a['std']:.4f}")
    lines.append(f"| mean{' ± std' if n > 1 else ''} (n={n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(rows: Sequence[dict], agg: dict, settings: dict, runs: dict, work: Path,
                    ml_steps: dict | None = None) -> str:
    seeds = [r["seed"] for r in rows]
    ml_steps = ml_steps or {}
    idle = [s for s in seeds if ml_steps.get(s) == 0]
    note = (f"**The MLS multi-label term never started** (seeds {', '.join(map(str, idle))}: the queue was "
            "not full before the last step), so MLS trained as MoCo-v2 there; raise the budget." if idle else
            "Steps with the MLS multi-label term on, per seed: "
            + ", ".join(f"{s}: {'unknown' if ml_steps.get(s) is None else ml_steps[s]}" for s in seeds) + ".")
    walls = [s["wall_s"] for per in runs.values() for s in per.values() if s.get("wall_s") is not None]
    d = agg["mls_minus_moco"]
    spread = f" (sample std over seeds {d['std']:.4f})" if d["std"] is not None else ""
    extra = f", --set {' '.join(settings['set'])}" if settings["set"] else ""
    fit = f"{min(walls):.0f}-{max(walls):.0f} s" if walls else "n/a"
    cmd = " ".join(train_argv("METHOD", seeds[0], work / f"seed{seeds[0]}" / "METHOD", settings)[1:])
    return "\n".join([
        "# MLS vs MoCo-v2 on the generated scenes (linear-probe macro mAP, held-out scenes)",
        "",
        format_table(rows, agg),
        "",
        f"MLS above MoCo-v2 in {agg['mls_wins']} of {len(rows)} seeds; mean MLS - MoCo {d['mean']:+.4f}{spread}; "
        f"MoCo-v2 - random init {agg['moco_minus_random']['mean']:+.4f}, "
        f"MLS - random init {agg['mls_minus_random']['mean']:+.4f}.",
        "",
        f"Budget per run: preset {settings['preset']}, {settings['epochs']} epochs x {settings['num_scenes']} "
        f"scenes, global batch {settings['batch_size']}, {settings['num_workers']} workers{extra}. "
        f"Seeds {', '.join(map(str, seeds))}. Training wall time per run (Ray Train fit): {fit}.",
        "",
        note,
        "",
        "Each run (METHOD = moco or mls; other seeds differ only in --seed and --output):",
        "",
        f"    python {cmd}",
        "",
    ])


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MLS vs MoCo-v2 (and a random-init backbone) on the built-in scenes, "
                                            "linear-probe mAP over seeds")
    p.add_argument("--work", required=True, help="directory for the runs and results (resumed when it holds them)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: the quick preset's")
    p.add_argument("--num-scenes", type=int, default=None, help="training scenes (default: the quick preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the quick preset's)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="passed to both methods' runs (repeatable)")
    return p


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner,
         random_init: Callable[[Path], float] = random_init_in_process) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.work).resolve()
    seeds = list(dict.fromkeys(args.seeds))
    settings = settings_from_args(args)
    check_work_dir(work, settings)
    runs: dict[int, dict[str, dict]] = {}
    ml_steps: dict[int, int | None] = {}
    rows = []
    try:
        for seed in seeds:
            runs[seed] = {m: run_one(work, seed, m, settings, runner) for m in METHODS}
            moco, mls = runs[seed]["moco"], runs[seed]["mls"]
            random = random_init_for_seed(work, seed, moco, mls, random_init)
            rows.append(per_seed_row(seed, random, float(moco[moco["metric"]]), float(mls[mls["metric"]])))
            ml_steps[seed] = multilabel_steps(work / f"seed{seed}" / "mls", mls)
            if ml_steps[seed] == 0:
                _log(f"WARNING seed {seed}: the MLS multi-label term never started (the queue was not full "
                     "before the last step): MLS trained as MoCo-v2; raise --epochs or --num-scenes")
    except RunFailed as exc:
        _log(f"{exc}; last lines of {exc.log}:\n{exc.tail}")
        print(json.dumps({"failed": {"method": exc.method, "seed": exc.seed, "returncode": exc.returncode,
                                     "log": str(exc.log)}, "finished_seeds": [r["seed"] for r in rows]}))
        return 1
    agg = aggregate(rows)
    table = format_table(rows, agg)
    results = {"metric": "linear_map", "settings": settings, "seeds": seeds, "rows": rows, "aggregate": agg,
               "mls_multilabel_steps": {str(s): n for s, n in ml_steps.items()},
               "runs": {str(s): {m: {k: v for k, v in r.items() if k != "data"} for m, r in per.items()}
                        for s, per in runs.items()}}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    (work / "results.md").write_text(format_markdown(rows, agg, settings, runs, work, ml_steps))
    print(table)
    short = {"seeds": seeds, "epochs": settings["epochs"], "num_scenes": settings["num_scenes"],
             **{c: agg[c] for c in ("random", "moco", "mls", "mls_minus_moco")}, "mls_wins": agg["mls_wins"],
             "mls_multilabel_steps": {str(s): n for s, n in ml_steps.items()},
             "results": str(work / "results.json")}
    print(json.dumps(short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
