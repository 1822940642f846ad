"""``python -m rayssl.train``: the command line and the Ray Train driver.

Everything a user can get wrong is checked before Ray starts. The run's resolved config
goes to ``<output>/config.yaml``; checkpoints to ``<output>/checkpoint_*``; the summary to
``<output>/summary.json`` and, as one JSON line, to the last line of stdout. Progress and
logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

from rayssl.config import Config, ConfigError, deep_merge, load_yaml, parse_assignment
from rayssl.methods import get_method, method_names
from rayssl.presets import preset_names, resolve_preset
from rayssl.storage import add_s3_flags

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
    "keep_checkpoints": "run.keep_checkpoints",
    "s3_endpoint": "data.s3_endpoint",
    "s3_anonymous": "data.s3_anonymous",
    "pseudo_labels": "cdul.pseudo_labels",
    "shared_output": "run.shared_output",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rayssl.train",
        description=(
            "Self-supervised pretraining of an image backbone on Ray Train. With no arguments: SwAV on "
            "the built-in generated scenes, 2 workers on a local Ray, a few minutes on a laptop CPU. "
            "Settings resolve as: paper defaults < --preset < --config FILE < flags < --set."
        ),
    )
    p.add_argument("--method", choices=method_names(), default=None,
                   help="training method (default: swav)")
    p.add_argument("--data", default=None,
                   help="images to train on: 'scenes' (built-in generated scenes) or a folder of image files")
    p.add_argument("--output", default=None,
                   help="directory (local path or s3:// URI) for the resolved config, checkpoints and summary; "
                        "default ./runs/<method>-<timestamp>")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (quick preset: 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch size, split evenly over the workers (quick preset: 64)")
    p.add_argument("--num-workers", type=int, default=None, help="number of Ray Train workers (default 2)")
    p.add_argument("--use-gpu", choices=["auto", "true", "false"], default=None,
                   help="train on GPUs; auto: when the Ray cluster has GPUs (default auto)")
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
    p.add_argument("--keep-checkpoints", type=int, default=None, help="how many latest checkpoints to keep")
    add_s3_flags(p)
    p.add_argument("--shared-output", action="store_const", const=True, default=None,
                   help="the local --output path is a shared filesystem (NFS, EFS...) mounted at the same place "
                        "on every node; without it a local --output is refused on a multi-node cluster")
    p.add_argument("--pseudo-labels", default=None, metavar="URI",
                   help="--method cdul: output folder/URI of `python -m rayssl.pseudolabel` (the initial soft labels)")
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
    return p


def run_tracker(cfg: Config, args: argparse.Namespace):
    """The Ray Train callback writing metrics.jsonl, curves.png and the optional trackers."""
    from rayssl.viz.tracking import RunTracker

    return RunTracker(cfg.run.output, get_method(cfg.run.method).metric,
                      title=f"{cfg.run.method} ({cfg.model.backbone}) {cfg.run.output}",
                      tensorboard=args.tensorboard, mlflow=args.mlflow, run_name=Path(cfg.run.output).name,
                      params={"method": cfg.run.method, "backbone": cfg.model.backbone,
                              "batch_size": cfg.run.batch_size, "epochs": cfg.run.epochs},
                      epochs=cfg.run.epochs)


def _flag_overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "use_gpu":
            value = {"auto": None, "true": True, "false": False}[value]
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    for assignment in args.set:
        out = deep_merge(out, parse_assignment(assignment))
    return out


def _name_flag(msg: str) -> str:
    """Prefix a config error with the command-line flag that sets that key, if any."""
    for flag, key in FLAG_KEYS.items():
        if msg.startswith(key + ":"):
            return f"--{flag.replace('_', '-')} ({key}):{msg[len(key) + 1:]}"
    return msg


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < preset < --config < flags (< --set). On --resume the stored config is the base."""
    overrides = _flag_overrides(args)
    file_cfg = load_yaml(args.config) if args.config else {}
    method = (overrides.get("run", {}).get("method") or file_cfg.get("run", {}).get("method") or "swav")
    if method not in method_names():
        raise ConfigError(f"--method: unknown method {method!r}; choose one of {', '.join(method_names())}")
    if method != "cdul" and getattr(args, "pseudo_labels", None):
        raise ConfigError("--pseudo-labels: only used by --method cdul")
    source = overrides.get("data", {}).get("source") or file_cfg.get("data", {}).get("source") or "scenes"
    preset = resolve_preset(args.preset, source, method)
    raw = deep_merge(deep_merge(preset, file_cfg), overrides)
    raw.setdefault("run", {})["method"] = method
    return _config_from(raw)


def _config_from(raw: dict) -> Config:
    """The Config the CLI runs, fresh or resumed: local paths the training workers open
    themselves are made absolute, since Ray's workers do not run in the shell's directory
    (``--pseudo-labels runs/labels`` would not resolve there)."""
    import os

    cfg = Config.from_dict(raw)
    for key in ("pseudo_labels", "store_dir"):
        value = getattr(cfg.method, key, "")
        if value and "://" not in value:
            setattr(cfg.method, key, os.path.abspath(os.path.expanduser(value)))
    return cfg


def default_output(method: str) -> str:
    return str(Path("runs") / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def prepare_output(cfg: Config, args: argparse.Namespace) -> Config:
    """Refuse to overwrite a previous run; on --resume, start from the stored config."""
    from rayssl.storage import exists, read_text

    if not cfg.run.output:
        if args.resume:
            raise ConfigError("--resume needs --output naming the run to continue")
        cfg.run.output = default_output(cfg.run.method)
    stored = f"{cfg.run.output.rstrip('/')}/config.yaml"
    if args.resume:
        if not exists(stored):
            raise ConfigError(f"--resume: {cfg.run.output} holds no rayssl run (no config.yaml)")
        import yaml

        base = yaml.safe_load(read_text(stored))
        raw = deep_merge(base, _flag_overrides(args))
        raw["run"]["resume"] = True
        raw["run"]["output"] = cfg.run.output
        return _config_from(raw)  # a flag given again on --resume is as relative as the first time
    if exists(stored):
        if not exists(f"{cfg.run.output.rstrip('/')}/{SNAPSHOT_FILE}"):
            raise ConfigError(
                f"--output: {cfg.run.output} holds a run that stopped before its first checkpoint; choose "
                "another --output (nothing was overwritten). --resume would start it again from its stored "
                "config.yaml with your flags over it, but not a new --preset")
        raise ConfigError(
            f"--output: {cfg.run.output} already holds a run; pass --resume to continue it, "
            "or choose another --output (nothing was overwritten)"
        )
    return cfg


def check_data_source(cfg: Config):
    """Fail before Ray starts when the data cannot be found (DataError: one line naming the URI).

    Returns the listed ``Source`` (None for the built-in scenes), for ``run`` to reuse.
    """
    if cfg.data.builtin_scenes:
        # Real images smaller than a crop are skipped at read time (data.min_image_side); the
        # generated scenes all have one known size, so a crop larger than it is a typo.
        largest, side = max(cfg.data.crop_sizes), cfg.data.scenes_image_size
        if largest > side:
            raise ConfigError(
                f"data.crop_sizes: the largest crop ({largest} px) is larger than the built-in scenes "
                f"(data.scenes_image_size={side} px); lower data.crop_sizes or raise data.scenes_image_size"
            )
        return None
    from rayssl.data.pipeline import resolve_cfg_source

    return resolve_cfg_source(cfg)


def init_ray(cfg: Config):
    """Join the cluster in RAY_ADDRESS, reuse an already connected Ray, or start a local one."""
    import ray

    if ray.is_initialized():
        pass
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # joins the cluster named by RAY_ADDRESS (e.g. under `ray job submit`)
    else:
        # Loopback only: a laptop run needs no network, and Ray's state API (the dashboard
        # process) is what Ray Train's placement-group cleaner queries.
        ray.init(num_cpus=os.cpu_count() or 1, log_to_driver=True, _node_ip_address="127.0.0.1")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    return ray


def worker_resources(cfg: Config, cluster: dict) -> tuple[bool, dict]:
    """Decide GPU use and CPUs per worker so that Ray Data always keeps at least one CPU."""
    gpus = cluster.get("GPU", 0)
    use_gpu = cfg.run.use_gpu if cfg.run.use_gpu is not None else gpus >= 1
    if use_gpu and gpus < 1:
        raise ConfigError("--use-gpu: true, but the Ray cluster has no GPU")
    if cfg.run.cpus_per_worker is not None:
        return use_gpu, {"CPU": cfg.run.cpus_per_worker}
    cpus = cluster.get("CPU", 1)
    per = min(1.0, max(0.1, (cpus - 1.0) / cfg.run.num_workers))
    return use_gpu, {"CPU": round(per, 2)}


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of registered checkpoints


def carried_data_counts(point: dict | None) -> dict:
    """The data counts (images seen, skipped by reason, converted) that the run had reached
    at the checkpoint ``point``, as rank 0 reported them with it; so a resumed run's summary
    and its bad-data check count the whole run, not only the part after the resume. The
    count of worker-group starts stays behind: restarts are counted per process."""
    counts = ((point or {}).get("metrics") or {}).get("data") or {}
    return {k: v for k, v in counts.items() if k != "train.worker_group_starts"}


def resume_point(output: str) -> dict | None:
    """On --resume, make Ray Train restore the newest *complete* checkpoint under ``output``.

    Ray Train V2 hands the workers the checkpoint that ``<output>/checkpoint_manager_snapshot.json``
    names as latest, without looking inside it (and refuses to start at all when a listed
    directory is gone). A checkpoint damaged after Ray registered it (a file deleted or
    truncated, a partial copy or sync of the run directory) would then fail every resume.
    So each checkpoint the snapshot lists is verified here (``verify_checkpoint_dir``);
    incomplete ones are dropped from the snapshot, which is rewritten with the newest complete
    one as latest. Their directories are left in place, untouched, and named in the log.
    Returns the snapshot's record of the checkpoint that will be resumed from (its
    ``checkpoint_dir_name`` and the ``metrics`` reported with it); None when there is no
    snapshot or no complete checkpoint is left (the run then starts from epoch 0, with a warning).
    """
    from rayssl.checkpoint import CheckpointError, verify_checkpoint_dir
    from rayssl.loop import log
    from rayssl.storage import exists, filesystem, read_text, write_text

    base = output.rstrip("/")
    snapshot_uri = f"{base}/{SNAPSHOT_FILE}"
    if not exists(snapshot_uri):
        return None
    snap = json.loads(read_text(snapshot_uri))
    fs, root = filesystem(base)
    results = snap.get("checkpoint_results") or []
    indices = snap.get("checkpoint_report_indices") or []
    bad: dict[str, str] = {}
    for r in results:
        dir_name = r["checkpoint_dir_name"]
        try:
            verify_checkpoint_dir(f"{root.rstrip('/')}/{dir_name}", fs=fs)
        except CheckpointError as exc:
            bad[dir_name] = str(exc)
    if not bad:
        return snap.get("latest_checkpoint_result")
    for dir_name, why in bad.items():
        log(f"--resume: skipping incomplete checkpoint {base}/{dir_name} ({why})")
    kept = [(r, i) for r, i in zip(results, indices) if r["checkpoint_dir_name"] not in bad]
    newest = max(kept, key=lambda ri: ri[1])[0] if kept else None
    snap["checkpoint_results"] = [r for r, _ in kept]
    snap["checkpoint_report_indices"] = [i for _, i in kept]
    snap["latest_checkpoint_result"] = newest
    pending = [(r, v) for r, v in zip(snap.get("pending_training_results") or [],
                                      snap.get("pending_validation_specs") or [])
               if r["checkpoint_dir_name"] not in bad]
    snap["pending_training_results"] = [r for r, _ in pending]
    snap["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snap:
            snap[key] = [n for n in snap[key] if n not in bad]
    write_text(snapshot_uri, json.dumps(snap))
    if newest is None:
        log(f"--resume: WARNING no complete checkpoint in {base}; training starts again from epoch 0")
        return None
    log(f"--resume: resuming from {base}/{newest['checkpoint_dir_name']}")
    return newest


def cluster_capacity(ray) -> tuple[dict, int]:
    """``(resources, nodes)`` that the connected cluster has now or can autoscale to.

    On a ``ray up`` cluster whose GPU workers scale from zero (cluster/aws.yaml), a job
    starts on the head alone: its GPUs and extra nodes exist only in the autoscaler's
    config, which Ray keeps in the GCS. Sizing from ``ray.cluster_resources()`` alone
    would train on CPUs there. Local Ray (no autoscaler) gives what it has.
    """
    resources = dict(ray.cluster_resources())
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        most = state.get_max_resources_from_cluster_config() if config is not None else None
    except Exception:  # an older or unusual cluster: what is there now is what we size for
        config, most = None, None
    if config is not None and config.node_group_configs:
        for key, value in (most or {}).items():
            resources[key] = max(float(resources.get(key, 0)), float(value))
        counts = [g.max_count for g in config.node_group_configs]
        nodes = max(nodes, sys.maxsize if -1 in counts else sum(counts))
    return resources, nodes


def check_output_shared(cfg: Config, num_nodes: int) -> None:
    """Refuse a node-local ``--output`` when the training workers may sit on several machines.

    Ray Train persists each worker's checkpoint files from the worker's own node: with a plain
    local path, the files of workers on other nodes land on those nodes' disks, and neither the
    summary nor ``--resume`` can find a complete checkpoint afterwards.
    """
    from rayssl.storage import is_remote

    if num_nodes > 1 and not is_remote(cfg.run.output) and not cfg.run.shared_output:
        raise ConfigError(
            f"run.output: {cfg.run.output} is a local path, but the Ray cluster has (or can scale to) "
            f"{num_nodes if num_nodes < sys.maxsize else 'any number of'} nodes: workers "
            "on other nodes would write their checkpoint files to their own disks, where neither the summary "
            "nor --resume can find them. Use storage every node reaches (--output s3://bucket/prefix), or pass "
            "--shared-output if this path is a shared filesystem mounted at the same place on every node"
        )


def checkpoint_uri(path: str, output: str) -> str:
    """A checkpoint path as Ray Train reports it (no scheme on remote storage) -> a URI like ``output``."""
    from rayssl.storage import is_remote

    if is_remote(output) and "://" not in path:
        return output.split("://", 1)[0] + "://" + path
    return path


def deterministic_data_config():
    """``data.deterministic``: Ray Data preserves order, so ``streaming_split`` hands every
    worker the same rows in the same order on every run (it ignores locality then)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def stop_on_non_finite():
    """A Ray Train callback that ends the run when a worker failed on a non-finite loss or code.

    Ray Train retries a worker's FloatingPointError like a dead worker, but a NaN recurs
    from the same checkpoint with the same data: retrying would only spend --max-failures.
    An error raised in a callback is a controller error, which Ray Train never retries.
    """
    from ray.train import UserCallback

    from rayssl.data.pipeline import wrapped_error_message

    class StopOnNonFinite(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank in sorted(worker_exceptions):
                msg = wrapped_error_message(worker_exceptions[rank], FloatingPointError)
                if msg:
                    raise FloatingPointError(f"{msg} (worker {rank}; not retried: it would recur)")

    return StopOnNonFinite()


def run(cfg: Config, callbacks: Sequence = (), source=None) -> dict:
    """Start (or join) Ray, train, and return the summary dict.

    ``callbacks`` are Ray Train callbacks added to the run (a Tune sweep passes
    ``TuneReportCallback`` to forward rank 0's per-epoch metrics to Tune). ``source``:
    the data source ``check_data_source`` already listed (listed again when None).
    """
    ray = init_ray(cfg)
    capacity, num_nodes = cluster_capacity(ray)
    check_output_shared(cfg, num_nodes)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayssl.data.pipeline import build_train_data
    from rayssl.loop import log, train_loop_per_worker
    from rayssl.storage import run_location, write_text

    use_gpu, resources = worker_resources(cfg, capacity)
    if cfg.run.method == "cdul":  # rows keep each image's index for the label store
        from rayssl.data.indexed import build_indexed_train_data

        data = build_indexed_train_data(cfg, cfg.method.pseudo_labels)
    else:
        data = build_train_data(cfg, source=source)
    steps_per_epoch = data.num_images // cfg.run.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--batch-size: global batch {cfg.run.batch_size} exceeds the {data.num_images} training images"
        )
    write_text(f"{cfg.run.output.rstrip('/')}/config.yaml", cfg.to_yaml())
    if cfg.run.resume:
        carried = carried_data_counts(resume_point(cfg.run.output))
        if carried:  # before any map task reports: the totals include the run so far
            ray.get(data.stats.add.remote(carried))
    storage_path, name, fs = run_location(cfg.run.output)
    log(f"{cfg.run.method}: {data.num_images} images, {steps_per_epoch} steps/epoch x {cfg.run.epochs} epochs, "
        f"{cfg.run.num_workers} workers ({'GPU' if use_gpu else 'CPU'}, {resources['CPU']} CPU each), "
        f"output {cfg.run.output}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch, "stats": data.stats},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[*callbacks, stop_on_non_finite()],
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
        datasets={"train": data.dataset},
        dataset_config=deterministic_data_config() if cfg.data.deterministic else None,
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    m = dict(result.metrics or {})
    ckpt = checkpoint_uri(result.checkpoint.path, cfg.run.output) if result.checkpoint is not None else None
    summary = {
        "method": cfg.run.method,
        "epochs": m.get("epoch"),
        "steps": m.get("step"),
        "images_seen": m.get("images_seen"),
        "images_per_s": round(m.get("images_per_s", 0.0), 2),
        "final_loss": m.get("loss"),
        "metric": get_method(cfg.run.method).metric,
        get_method(cfg.run.method).metric: m.get(get_method(cfg.run.method).metric),
    }
    metric = get_method(cfg.run.method).metric
    if f"{metric}_random_init" in m:
        summary[f"{metric}_random_init"] = m[f"{metric}_random_init"]
    counts = ray.get(data.stats.get.remote())
    summary.update({
        "restarts": max(0, counts.pop("train.worker_group_starts", 1) - 1),
        "data": {k: v for k, v in counts.items()},
        "wall_s": round(wall, 1),
        "output": cfg.run.output,
        "checkpoint": ckpt,
    })
    write_text(f"{cfg.run.output.rstrip('/')}/summary.json", json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args)
        from rayssl.storage import S3Options, configure_s3

        configure_s3(S3Options.from_config(cfg))  # before any look-up of an s3:// output
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        cfg = prepare_output(cfg, args)
        source = check_data_source(cfg)
        from rayssl.viz.tracking import tracking_requirements

        tracking_requirements(args.tensorboard, args.mlflow, cfg.run.output)
    except (ConfigError, ValueError) as exc:
        parser.error(_name_flag(str(exc)))
    started_ray = not _ray_connected()
    try:
        summary = run(cfg, callbacks=[run_tracker(cfg, args)], source=source)
    except ConfigError as exc:
        parser.error(_name_flag(str(exc)))
    except KeyboardInterrupt:
        print("interrupted; continue with --resume --output " + cfg.run.output, file=sys.stderr)
        return 130
    except Exception as exc:  # a training failure: one readable line, then the details above it
        from rayssl.data.pipeline import data_error_message, wrapped_error_message

        why = data_error_message(exc) or wrapped_error_message(exc, FloatingPointError) or _root_cause(exc)
        print(f"rayssl: training failed: {why}", file=sys.stderr)
        print(f"rayssl: run directory {cfg.run.output}; continue with --resume once fixed", file=sys.stderr)
        return 1
    finally:
        if started_ray:
            _shutdown_ray()
    print(f"[rayssl] checkpoint: {summary['checkpoint']}", file=sys.stderr)
    note = baseline_note(summary, cfg.data.builtin_scenes)
    if note:
        print(note, file=sys.stderr)
    sys.stdout.flush()
    print(json.dumps(summary), flush=True)
    return 0


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
    if builtin_scenes and summary.get("method") == "swav":
        return (line + ". On the built-in scenes SwAV's gain over its random init within the default "
                "budget is small next to the spread between seeds, and some seeds end at or below it "
                "(README, 'Measured'); the install is not broken")
    return line + ": the backbone has not yet learned features this metric rewards; train for longer"


def _root_cause(exc: BaseException) -> str:
    """The innermost error message of a (Ray-wrapped) exception chain, on one line."""
    seen = exc
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"


def _ray_connected() -> bool:
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
