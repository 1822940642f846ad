"""``rayssl train`` / ``python -m rayssl.train``: pretrain a backbone on Ray Train.

Everything a user can get wrong is checked before Ray starts. The run's resolved config
goes to ``<output>/config.yaml``; checkpoints to ``<output>/checkpoint_*``; the summary to
``<output>/summary.json`` and, as one JSON line, to the last line of stdout. Progress and
logs go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import yaml

from rayssl.cli.common import add_gpu_flag, add_s3_flags, gpu_choice, run_command
from rayssl.config import Config, ConfigError, apply_assignments, deep_merge, load_yaml
from rayssl.data.pipeline import resolve_data_source
from rayssl.data.sources import DataError, Source
from rayssl.eval.evaluate import EvalError, open_run_sources, run_metric
from rayssl.methods import get_method, method_names
from rayssl.modules.backbone import build_backbone
from rayssl.modules.pretrained import load_into, read_weights
from rayssl.presets import layered_config, preset_names
from rayssl.runtime.internals import SNAPSHOT_FILE
from rayssl.runtime.reports import newest_checkpoint
from rayssl.storage import S3Options, exists, read_text
from rayssl.viz.tracking import RunRecorder, tracking_requirements, wandb_environment

PROG = "python -m rayssl.train"

# flag -> config key, for both building the config and naming the flag in errors
FLAG_KEYS: dict[str, str] = {
    "method": "run.method",
    "data": "data.source",
    "output": "run.output",
    "epochs": "run.epochs",
    "batch_size": "run.batch_size",
    "num_workers": "run.num_workers",
    "use_gpu": "run.use_gpu",
    "cpus_per_worker": "run.cpus_per_worker",
    "seed": "run.seed",
    "max_failures": "run.max_failures",
    "checkpoint_every": "run.checkpoint_every_epochs",
    "checkpoint_every_steps": "run.checkpoint_every_steps",
    "max_preemptions": "run.max_preemptions",
    "keep_checkpoints": "run.keep_checkpoints",
    "s3_endpoint": "data.s3_endpoint",
    "s3_anonymous": "data.s3_anonymous",
    "pseudo_labels": "cdul.pseudo_labels",
    "shared_output": "run.shared_output",
    "eval_data": "eval.data",
    "eval_labels": "eval.labels",
    "eval_test_data": "eval.test_data",
    "eval_test_labels": "eval.test_labels",
    "progress": "run.progress_bars",
}


def worker_range(text: str) -> int | tuple[int, int]:
    """``--num-workers``: N, or MIN-MAX for an elastic run."""
    low, sep, high = text.partition("-")
    try:
        counts = (int(low), int(high)) if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX (e.g. 2-8), got {text!r}") from None
    if isinstance(counts, tuple) and counts[0] > counts[1]:
        raise argparse.ArgumentTypeError(f"MIN-MAX needs MIN <= MAX, got {text!r}")
    return counts


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Self-supervised pretraining of an image backbone on Ray Train. With no arguments: SwAV on "
            "the built-in generated scenes, 2 workers on a local Ray, a few minutes on a laptop CPU. "
            "Settings resolve as: paper defaults < --preset < --config FILE < flags < --set."
        ),
    )
    p.add_argument("--method", choices=method_names(), default=None, help="training method (default: swav)")
    p.add_argument("--data", default=None,
                   help="images to train on: 'scenes' (built-in generated scenes), a folder or s3:// prefix of "
                        "images, or webdataset .tar / Parquet shards")
    p.add_argument("--output", default=None,
                   help="directory (local path or s3:// URI) for the resolved config, checkpoints and summary; "
                        "default ./runs/<method>-<timestamp>")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (quick preset: 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch size, split evenly over the workers (quick preset: 64)")
    p.add_argument("--num-workers", type=worker_range, default=None, metavar="N|MIN-MAX",
                   help="number of Ray Train workers (default 2); MIN-MAX: elastic, as many as the cluster holds "
                        "(the global batch stays --batch-size); 0: train in this process, Ray Data feeding it "
                        "(no worker start, restarts or resizes: fastest on one machine)")
    add_gpu_flag(p, "training workers", default=None)
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per training worker; default: sized so Ray Data keeps >= 1 CPU")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML file of sections (run:, data:, model:, optim:, eval:, <method>:) overriding defaults")
    p.add_argument("--preset", choices=["auto", *preset_names()], default="auto",
                   help="bundle of settings: quick (small CPU run), paper (the paper's recipe); "
                        "auto = quick on the built-in scenes, paper otherwise")
    p.add_argument("--resume", action="store_true",
                   help="continue the run stored under --output from its latest complete checkpoint")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker failures to recover from by restarting from the last checkpoint (-1: unlimited)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="EPOCHS",
                   help="checkpoint every N epochs (always at the end)")
    p.add_argument("--checkpoint-every-steps", type=int, default=None, metavar="STEPS",
                   help="also checkpoint every N steps inside an epoch; a resumed run continues from the step")
    p.add_argument("--max-preemptions", type=int, default=None,
                   help="spot preemptions to recover from (a just-in-time checkpoint is written when a node is "
                        "about to be reclaimed), apart from --max-failures; -1 (default): unlimited")
    p.add_argument("--keep-checkpoints", type=int, default=None, help="how many latest checkpoints to keep")
    add_s3_flags(p)
    p.add_argument("--shared-output", action="store_const", const=True, default=None,
                   help="the local --output path is a shared filesystem (NFS, EFS...) mounted at the same place "
                        "on every node; without it a local --output is refused on a multi-node cluster")
    p.add_argument("--pseudo-labels", default=None, metavar="URI",
                   help="--method cdul: output folder/URI of `python -m rayssl.pseudolabel` (the initial soft labels)")
    p.add_argument("--eval-data", default=None, metavar="URI",
                   help="labelled images to evaluate the backbone on during the run (an ImageFolder folder or "
                        "s3:// prefix, or images / shards with --eval-labels); default: held-out scenes when "
                        "training on the scenes, else no evaluation")
    p.add_argument("--eval-labels", default=None, metavar="TABLE",
                   help="labels of --eval-data (.csv / .parquet: id + classes joined by '|'); default: its class folders")
    p.add_argument("--eval-test-data", default=None, metavar="URI",
                   help="held-out labelled images; default: a seeded eval.test_fraction (0.2) of --eval-data")
    p.add_argument("--eval-test-labels", default=None, metavar="TABLE", help="labels of --eval-test-data")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set swav.epsilon=0.03 (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit without starting Ray")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write TensorBoard event files (default DIR: <output>/tensorboard); "
                        "<output>/metrics.jsonl and <output>/curves.png are always written")
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="TRACKING_URI",
                   help="also log params and per-epoch metrics to MLflow (needs mlflow installed; "
                        "default URI: MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log params, per-step and per-epoch metrics to Weights & Biases project PROJECT "
                        "(needs wandb installed and logged in; WANDB_MODE=offline works without network)")
    p.add_argument("--progress", action="store_true", default=None,
                   help="show Ray Data's progress bars (off by default: they flood a log file)")
    return p


# ----------------------------------------------------------------------------- the config


def flag_overrides(args: argparse.Namespace) -> dict:
    """The config keys the flags (and ``--set``) give, nested by section."""
    out: dict = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "use_gpu":
            value = gpu_choice(value)
        if flag == "num_workers":  # N: exactly N (also over a stored elastic range); MIN-MAX: elastic
            value, out.setdefault("run", {})["max_workers"] = value if isinstance(value, tuple) else (value, None)
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return apply_assignments(out, args.set)


def name_flag(msg: str) -> str:
    """Prefix a config error with the command-line flag that sets that key, if any."""
    for flag, key in FLAG_KEYS.items():
        if msg.startswith(key + ":"):
            return f"--{flag.replace('_', '-')} ({key}):{msg[len(key) + 1:]}"
    return msg


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < preset < --config < flags (< --set) (``rayssl.presets.layered_config``)."""
    overrides = flag_overrides(args)
    file_cfg = load_yaml(args.config) if args.config else {}
    method = overrides.get("run", {}).get("method") or file_cfg.get("run", {}).get("method") or "swav"
    for flag, key in FLAG_KEYS.items():  # a flag of another method's section
        section = key.split(".")[0]
        if section in method_names() and section != method and getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')}: only used by --method {section}")
    return localised(layered_config(overrides, file_cfg, args.preset))


def localised(cfg: Config) -> Config:
    """The Config the CLI runs, fresh or resumed, with what this shell means made explicit for
    every process of the run: local paths the training workers open themselves (the method's
    ``path_keys``) made absolute, since Ray's workers do not run in the shell's directory
    (``--pseudo-labels runs/labels`` would not resolve there); and the S3 endpoint this shell's
    environment names, since Ray's other processes must not read it from their own."""
    cfg.data.s3_endpoint = S3Options.resolved(cfg.data.s3_endpoint).endpoint
    for section, key in ([(cfg.method, k) for k in cfg.method.path_keys] + [(cfg.model, "pretrained")]
                         + [(cfg.eval, k) for k in ("data", "labels", "test_data", "test_labels")]):
        value = getattr(section, key, "")
        if value and "://" not in value and value.split(":", 1)[0] not in ("torchvision", "timm"):
            setattr(section, key, os.path.abspath(os.path.expanduser(value)))
    return cfg


def prepare_output(cfg: Config, args: argparse.Namespace) -> Config:
    """Refuse to overwrite a previous run; on --resume, start from the stored config."""
    if not cfg.run.output:
        if args.resume:
            raise ConfigError("--resume needs --output naming the run to continue")
        cfg.run.output = str(Path("runs") / f"{cfg.run.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    stored = f"{cfg.run.output.rstrip('/')}/config.yaml"
    options = cfg.data.s3.signed()  # the run's own files
    if args.resume:
        if not exists(stored, options):
            raise ConfigError(f"--resume: {cfg.run.output} holds no rayssl run (no config.yaml)")
        raw = deep_merge(yaml.safe_load(read_text(stored, options)), flag_overrides(args))
        raw["run"]["resume"] = True
        raw["run"]["output"] = cfg.run.output
        return localised(Config.from_dict(raw))  # a flag given again is as relative as the first time
    if exists(stored, options):
        if not exists(f"{cfg.run.output.rstrip('/')}/{SNAPSHOT_FILE}", options) \
                and newest_checkpoint(cfg.run.output, options) is None:  # neither on workers nor in-process
            raise ConfigError(
                f"--output: {cfg.run.output} holds a run that stopped before its first checkpoint; choose "
                "another --output (nothing was overwritten). --resume would start it again from its stored "
                "config.yaml with your flags over it, but not a new --preset")
        raise ConfigError(
            f"--output: {cfg.run.output} already holds a run; pass --resume to continue it, "
            "or choose another --output (nothing was overwritten)")
    return cfg


def check_pretrained(cfg: Config) -> None:
    """The starting weights fit the backbone (``model.pretrained``), checked before Ray starts:
    ConfigError with the lists of missing and unexpected keys when they do not."""
    if not cfg.model.pretrained:
        return
    net, _ = build_backbone(cfg.model.backbone, cfg.model.small_stem)
    state, origin = read_weights(cfg.model.pretrained, cfg.model.backbone, cfg.data.s3.signed())
    note = load_into(net, state, cfg.model.backbone, cfg.model.pretrained)
    print(f"[rayssl] the backbone starts from {origin}" + (f"; {note}" if note else ""), file=sys.stderr)


def check_data_source(cfg: Config) -> Source | None:
    """Fail before Ray starts when the data cannot be found (one line naming the URI); returns
    the listed source (None for the built-in scenes), for the driver to reuse."""
    if cfg.data.builtin_scenes:
        # Real images smaller than a crop are skipped at read time (data.min_image_side); the
        # generated scenes all have one known size, so a crop larger than it is a typo.
        largest, side = max(cfg.data.crop_sizes), cfg.data.scenes_image_size
        if largest > side:
            raise ConfigError(
                f"data.crop_sizes: the largest crop ({largest} px) is larger than the built-in scenes "
                f"(data.scenes_image_size={side} px); lower data.crop_sizes or raise data.scenes_image_size")
        return None
    return resolve_data_source(cfg.data)


def check_eval_source(cfg: Config) -> None:
    """``--eval-data`` and its labels found and matched before Ray starts (one line naming the
    option), and ``eval.protocol=auto`` resolved from the labels (stored in the run's config)."""
    if not cfg.eval.data:
        return
    try:
        open_run_sources(cfg.eval, cfg.run.seed, cfg.data.s3, cfg.data.parquet_image_column)
    except (EvalError, DataError) as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(("--eval-", "eval.")) else f"--eval-data: {msg}") from None


def baseline_note(summary: dict, builtin_scenes: bool) -> str | None:
    """A line for a run whose evaluation did not beat its random-init backbone, else None.

    A user who sees the trained score below the untrained one may take it for a broken
    install; say what it means instead of leaving the two numbers to speak for themselves.
    """
    metric = summary.get("metric")
    score, baseline = summary.get(metric), summary.get(f"{metric}_random_init")
    if score is None or baseline is None or score > baseline:
        return None
    line = f"[rayssl] note: {metric} {score:.3f} is not above the random-init backbone's {baseline:.3f}"
    if baseline >= 1.0:  # every metric here is at most 1: nothing is left to win on these images
        return line + (": a random backbone already scores the maximum on these labelled images, so they cannot "
                       "show what training learned; evaluate on harder ones")
    note = get_method(summary["method"]).scenes_note if builtin_scenes else ""
    return line + (f": {note}" if note else ": the backbone has not yet learned features this metric rewards; "
                   "train for longer")


# ----------------------------------------------------------------------------- the command


@dataclass
class Prepared:
    cfg: Config
    source: Source | None
    recorder: RunRecorder


def prepare(args: argparse.Namespace) -> Prepared | None:
    """Everything checked and resolved, nothing started; None for --print-config."""
    try:
        cfg = resolve_config(args)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return None
        cfg = prepare_output(cfg, args)
        source = check_data_source(cfg)
        check_eval_source(cfg)
        check_pretrained(cfg)
        tracking_requirements(args.tensorboard, args.mlflow, cfg.run.output, args.wandb)
    except ConfigError as exc:
        raise ConfigError(name_flag(str(exc))) from None
    spec = get_method(cfg.run.method)
    recorder = RunRecorder(cfg.run.output, run_metric(cfg.eval, spec.metric), title=f"{cfg.run.method} ({cfg.model.backbone}) {cfg.run.output}",
                           tensorboard=args.tensorboard, mlflow=args.mlflow, run_name=Path(cfg.run.output).name,
                           params={"method": cfg.run.method, "backbone": cfg.model.backbone,
                                   "batch_size": cfg.run.batch_size, "epochs": cfg.run.epochs},
                           epochs=cfg.run.epochs, options=cfg.data.s3.signed(), wandb=args.wandb,
                           wandb_env=wandb_environment() if args.wandb else None)
    return Prepared(cfg, source, recorder)


def execute(prepared: Prepared) -> dict:
    # Ray Train is imported when a run starts, so --help and --print-config answer at once.
    from rayssl.runtime.callbacks import RunTracker
    from rayssl.runtime.driver import train

    cfg = prepared.cfg
    try:
        summary = train(cfg, callbacks=[RunTracker(prepared.recorder)], source=prepared.source)
    except ConfigError as exc:
        raise ConfigError(name_flag(str(exc))) from None
    print(f"[rayssl] checkpoint: {summary['checkpoint']}", file=sys.stderr)
    note = baseline_note(summary, cfg.data.builtin_scenes)
    if note:
        print(note, file=sys.stderr)
    return summary


def _hint(prepared: Prepared | None, what: str) -> str:
    out = prepared.cfg.run.output if prepared is not None else ""
    if what == "interrupted":
        return f"continue with --resume --output {out}"
    return f"run directory {out}; continue with --resume once fixed"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    return run_command(prog, lambda: prepare(args), execute, ray=True, hint=_hint)
