"""The Ray Train driver: one run of a resolved config, from the data to the summary.

``train(cfg)`` sizes the workers (``cluster.place``), builds the Ray Data pipeline of
``cfg.data`` (or, for a method with per-image state, the rows of its index table), writes the
resolved config next to the checkpoints, fits a ``TorchTrainer`` running
``rayssl.runtime.worker.train_loop_per_worker`` (on workers, or with ``run.num_workers=0`` in
this process: Ray Train's local mode, ``rayssl.runtime.reports.InProcessReports``) and returns
the run's summary (also written to ``<output>/summary.json``). Checks a user can act on have
run before (``rayssl.cli.train``); what only the cluster can tell (GPUs, nodes) is checked
here, before anything starts.
"""

from __future__ import annotations

import json
import time
from typing import Sequence

from ray.data import DataContext
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rayssl.checkpoint import progress
from rayssl.config import Config, ConfigError
from rayssl.data.indexed import build_indexed_train_data
from rayssl.data.pipeline import build_train_data
from rayssl.data.sources import Source
from rayssl.data.stats import PER_PROCESS, PREEMPTIONS, RESIZES, WORKER_STARTS, WORLD_SIZE
from rayssl.engine.monitor import TIME_KEYS, log
from rayssl.methods import get_method
from rayssl.eval.evaluate import run_metric
from rayssl.runtime.callbacks import StopOnNonFinite
from rayssl.runtime.evaluation import no_evaluation_note
from rayssl.runtime.cluster import capacity, check_output_shared, place, ray_session, ray_start_seconds
from rayssl.runtime.internals import resume_point
from rayssl.runtime.reports import InProcessReports, RayReports, newest_checkpoint
from rayssl.runtime.worker import train_loop_per_worker
from rayssl.storage import filesystem, is_remote, run_location, write_text

__all__ = ["carried_data_counts", "checkpoint_uri", "in_process_device", "resume_from", "time_spent", "time_text",
           "train"]


def carried_data_counts(point: dict | None) -> dict:
    """The data counts (images seen, skipped by reason, converted) that the run had reached
    at the checkpoint ``point``, as rank 0 reported them with it; so a resumed run's summary
    and its bad-data check count the whole run, not only the part after the resume. The
    counts of worker-group starts and preemptions stay behind: they are counted per process."""
    counts = ((point or {}).get("metrics") or {}).get("data") or {}
    return {k: v for k, v in counts.items() if k not in PER_PROCESS}


def checkpoint_uri(path: str, output: str) -> str:
    """A checkpoint path as Ray Train reports it (no scheme on remote storage) -> a URI like ``output``."""
    if is_remote(output) and "://" not in path:
        return output.split("://", 1)[0] + "://" + path
    return path


def _ingest_options(cfg: Config):
    """``data.deterministic``: Ray Data preserves order, so ``streaming_split`` hands every
    worker the same rows in the same order on every run (it ignores locality then)."""
    if not cfg.data.deterministic:
        return None
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _data_config(cfg: Config) -> DataConfig | None:
    options = _ingest_options(cfg)
    return None if options is None else DataConfig(execution_options=options)


def resume_from(output: str, options) -> tuple[str | None, dict]:
    """``--resume``: (the URI of the newest complete checkpoint of ``output``, the metrics reported
    with it), or (None, {}). Ray Train's snapshot lists the checkpoints its workers reported
    (``resume_point`` verifies them); an in-process part of the run stored its own beside them,
    each with its ``report.json``. A complete checkpoint of Ray Train's that its snapshot does not
    list (a run ended while registering it) is passed over, as before in-process runs existed."""
    point = resume_point(output, options)
    base = output.rstrip("/")
    listed = f"{base}/{point['checkpoint_dir_name']}" if point else None
    newest = newest_checkpoint(output, options)  # stored by an in-process run
    if newest is not None and (listed is None or _further(newest[0], listed, options)):
        log(f"--resume: resuming from {newest[0]}")
        return newest
    if listed is None:
        log(f"--resume: WARNING no complete checkpoint in {base}; training starts again from epoch 0")
    return listed, (point or {}).get("metrics") or {}


def _further(a: str, b: str, options) -> bool:
    """Had training gone further at checkpoint URI ``a`` than at ``b``?"""
    (fs, pa), (_, pb) = filesystem(a, options), filesystem(b, options)
    return progress(fs, pa) > progress(fs, pb)


def in_process_device(use_gpu: bool | None) -> str:
    """An in-process run's device: a GPU of this machine (``run.use_gpu`` None: when torch sees one).
    Ray Train's local mode would take CUDA whenever it is there, whatever the run asked for."""
    import torch

    if use_gpu and not torch.cuda.is_available():
        raise ConfigError("--use-gpu: an in-process run (--num-workers 0) trains on this machine, where torch "
                          "sees no GPU; run on workers to train on the cluster's GPUs")
    return "cuda" if (torch.cuda.is_available() if use_gpu is None else use_gpu) else "cpu"


def train(cfg: Config, callbacks: Sequence = (), source: Source | None = None) -> dict:
    """Train ``cfg`` on the connected (or a local) Ray; returns the summary dict.

    ``callbacks``: Ray Train callbacks added to the run (the CLI's metrics recorder; a Tune
    sweep's ``TuneReportCallback``). ``source``: the data source already listed by the caller.
    """
    with ray_session():
        t_ray = time.perf_counter()
        if cfg.run.progress_bars:  # an interactive user's choice (ray_session turns them off)
            DataContext.get_current().enable_progress_bars = True
        device = in_process_device(cfg.run.use_gpu) if cfg.run.in_process else None
        resources, num_nodes = capacity()
        check_output_shared(cfg.run.output, cfg.run.shared_output, num_nodes)
        # sized for the most workers the run may have
        placement = place(resources, max(cfg.run.worker_counts), cfg.run.use_gpu, cfg.run.cpus_per_worker)
        if cfg.model.sync_batchnorm and max(cfg.run.worker_counts) > 1 and not placement.use_gpu:
            raise ConfigError("model.sync_batchnorm: PyTorch's SyncBatchNorm runs on GPUs only, and this run's "
                              "workers train on CPUs; set model.sync_batchnorm=false (each worker then keeps "
                              "its own BatchNorm statistics)")
        index_table = cfg.method.indexed_data()
        if index_table:  # rows keep each image's index for the method's per-image state
            data = build_indexed_train_data(cfg.data, cfg.run.seed, index_table, source=source)
        else:
            data = build_train_data(cfg.data, cfg.run.seed, source=source, announce=log)
        steps_per_epoch = data.num_images // cfg.run.batch_size
        if steps_per_epoch < 1:
            raise ConfigError(
                f"--batch-size: global batch {cfg.run.batch_size} exceeds the {data.num_images} training images")
        options = cfg.data.s3.signed()  # the run's own files, from every process of the run
        write_text(f"{cfg.run.output.rstrip('/')}/config.yaml", cfg.to_yaml(), options)
        restore, reported = resume_from(cfg.run.output, options) if cfg.run.resume else (None, {})
        carried = carried_data_counts({"metrics": reported})
        if carried:  # before any map task reports: the totals include the run so far
            data.stats.add(carried, wait=True)
        if cfg.run.in_process:  # Ray Train's local mode keeps only the last report: rayssl stores them
            reports = InProcessReports(cfg.run.output, options, cfg.run.keep_checkpoints, callbacks, restore, reported)
            ingest = _ingest_options(cfg)
            if ingest is not None:
                data.dataset.context.execution_options = ingest
        else:
            reports = RayReports(restore, options)
        storage_path, name, fs = run_location(cfg.run.output, options)
        note = no_evaluation_note(cfg)
        if note:
            log(note)
        where = (f"in this process on {device.upper()} (run.num_workers=0: no worker restarts, preemption "
                 "checkpoints or resizes)"
                 if cfg.run.in_process else f"{cfg.run.workers_text} workers ({'GPU' if placement.use_gpu else 'CPU'}, "
                 f"{placement.cpus} CPU each)")
        log(f"{cfg.run.method}: {data.num_images} images, {steps_per_epoch} steps/epoch x {cfg.run.epochs} epochs, "
            f"{where}, output {cfg.run.output}")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch, "stats": data.stats,
                               "shuffled_at_source": data.shuffled_at_source, "reports": reports,
                               "device": device},
            scaling_config=ScalingConfig(num_workers=0) if cfg.run.in_process else
            ScalingConfig(num_workers=(cfg.run.num_workers, cfg.run.max_workers) if cfg.run.elastic
                          else cfg.run.num_workers, use_gpu=placement.use_gpu,
                          resources_per_worker={"CPU": placement.cpus},
                          elastic_resize_monitor_interval_s=cfg.run.elastic_check_s),
            run_config=RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                             max_preemption_failures=cfg.run.max_preemptions),
                callbacks=[*callbacks, StopOnNonFinite()],
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            ),
            datasets={"train": data.dataset},
            dataset_config=_data_config(cfg),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        t_end = time.perf_counter()
        counts = data.stats.get()
    if cfg.run.in_process:
        metrics, checkpoint = reports.last_metrics, reports.last_checkpoint
    else:
        metrics = result.metrics
        checkpoint = checkpoint_uri(result.checkpoint.path, cfg.run.output) if result.checkpoint is not None else None
    summary = _summary(cfg, metrics, checkpoint, counts, t_end - t0,
                       time_spent(metrics, ray_start_seconds(), t_end - t_ray))
    log(time_text(summary["time"]))
    return summary


def time_spent(metrics: dict | None, ray_start_s: float | None, after_ray_s: float) -> dict:
    """Where the run's time went after Ray started: rank 0's totals (``Monitor.totals``, as its
    last report carries them) against the wall time from the run's start on a running Ray (the
    command's, or the one it joined: ``ray_start_s``, None when it was running before) to the
    end of the fit.
    ``other_s`` is the rest: listing the data, starting the workers, the last checkpoint's upload,
    and whatever a restart lost. ``outside_steps_pct``: the share of that wall time not in steps."""
    spent = {k: float(v) for k, v in ((metrics or {}).get("time") or {}).items() if k in TIME_KEYS}
    accounted = spent.get("steps_s", 0.0) + spent.get("data_wait_s", 0.0) + spent.get("eval_s", 0.0) \
        + spent.get("checkpoint_s", 0.0)
    out = {"ray_start_s": ray_start_s, "after_ray_start_s": after_ray_s, **spent,
           "other_s": max(0.0, after_ray_s - accounted)}
    out = {k: None if v is None else round(v, 1) for k, v in out.items()}
    if after_ray_s > 0 and "steps_s" in spent:
        out["outside_steps_pct"] = round(100.0 * (after_ray_s - spent["steps_s"]) / after_ray_s, 1)
    return out


def time_text(t: dict) -> str:
    """The summary's ``time`` as one progress line."""
    start = "Ray was running" if t["ray_start_s"] is None else f"Ray started in {t['ray_start_s']:.1f} s"
    if "outside_steps_pct" not in t:
        return f"time: {start}, then {t['after_ray_start_s']:.1f} s"
    return (f"time: {start}, then {t['after_ray_start_s']:.1f} s, of which "
            f"{t['outside_steps_pct']:.1f}% outside training steps: waiting for data {t['data_wait_s']:.1f} s "
            f"(first batches {t['first_batch_s']:.1f} s), evaluation {t['eval_s']:.1f} s, checkpoints "
            f"{t['checkpoint_s']:.1f} s, starting the workers and the rest {t['other_s']:.1f} s")


def _summary(cfg: Config, metrics: dict | None, checkpoint: str | None, counts: dict, wall: float,
             spent: dict) -> dict:
    m = dict(metrics or {})
    metric = run_metric(cfg.eval, get_method(cfg.run.method).metric)
    summary = {
        "method": cfg.run.method,
        "epochs": m.get("epoch"),
        "steps": m.get("step"),
        "images_seen": m.get("images_seen"),
        "images_per_s": round(m.get("images_per_s", 0.0), 2),
        "final_loss": m.get("loss"),
        "pretrained": cfg.model.pretrained or None,  # the weights the backbone started from
        "metric": metric,
        metric: m.get(metric),
        # what the metric was measured on: the user's labelled images, held-out scenes, or none
        "eval_data": cfg.eval.data or ("scenes" if cfg.data.builtin_scenes and cfg.eval.num_test_images else None),
    }
    for start in ("random_init", "pretrained"):
        if f"{metric}_{start}" in m:
            summary[f"{metric}_{start}"] = m[f"{metric}_{start}"]
    for probe in ("probe_top1", "probe_map"):  # eval.online_probe's last score
        if probe in m:
            summary[probe] = m[probe]
    summary.update({
        # the workers' restarts: with another worker count (elastic), after a preemption notice,
        # and after anything else; and how many trained at the end
        "workers": counts.get(WORLD_SIZE) or cfg.run.num_workers,  # an in-process run: 1
        "resizes": counts.get(RESIZES, 0),
        "preemptions": counts.get(PREEMPTIONS, 0),
        "restarts": max(0, counts.get(WORKER_STARTS, 1) - 1 - counts.get(PREEMPTIONS, 0) - counts.get(RESIZES, 0)),
        "data": {k: v for k, v in counts.items() if k not in PER_PROCESS},
        "wall_s": round(wall, 1),
        "time": spent,
        "output": cfg.run.output,
        "checkpoint": checkpoint,
    })
    write_text(f"{cfg.run.output.rstrip('/')}/summary.json", json.dumps(summary, indent=2), cfg.data.s3.signed())
    return summary
