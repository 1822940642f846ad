"""The function Ray Train's ``TorchTrainer`` runs on every worker: Ray glue around the engine.

Ray enters only here: the worker's rank and device, its dataset shard, the checkpoint to
resume from, and ``ray.train.report`` (called the same number of times on every rank). The
model, the step, the progress and the evaluation are ``rayssl.engine`` (pure PyTorch).
"""

from __future__ import annotations

import tempfile
import time

import ray.train
import ray.train.torch

from rayssl.checkpoint import CheckpointError
from rayssl.config import Config
from rayssl.data.feed import TrainFeed
from rayssl.engine import Engine, Monitor, control_group, lockstep, log
from rayssl.runtime.evaluation import evaluator_for
from rayssl.storage import StorageError
from rayssl.storage.checked import take_write_failures

__all__ = ["train_loop_per_worker"]


def failed_uploads(epoch: int) -> None:
    """Stop the run when a file of the checkpoint just reported did not reach the store (after
    the storage retries): Ray Train's upload does not notice a failed close. The checkpoint
    stays incomplete (``verify_checkpoint_dir``) and ``--resume`` passes over it."""
    failed = take_write_failures()
    if failed:
        path, exc = failed[0]
        raise StorageError(f"the epoch-{epoch + 1} checkpoint did not reach the store: writing {path} failed "
                           f"after the retries ({type(exc).__name__}: {exc}); it is incomplete, and --resume "
                           f"continues from the previous complete checkpoint")


def train_loop_per_worker(payload: dict) -> None:
    """``payload``: ``config`` (``Config.to_dict()``), ``steps_per_epoch``, the run's ``stats``
    (``rayssl.data.stats.DataCounts``) and ``shuffled_at_source`` (``TrainData``'s)."""
    cfg = Config.from_dict(payload["config"])
    steps_per_epoch, stats = payload["steps_per_epoch"], payload["stats"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine = Engine(cfg, steps_per_epoch, ray.train.torch.get_device(), world_size=world, rank=rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            try:
                note = engine.restore(directory)  # verifies the manifest first
            except CheckpointError as exc:  # e.g. the newest upload failed, then a worker restarted
                raise CheckpointError(f"Ray Train restored {checkpoint.path}: {exc}; start the run again with "
                                      "--resume: it passes over incomplete checkpoints") from None
        if rank == 0:
            log(note)
    engine.start()
    if rank == 0:
        stats.count_worker_start()  # restarts = starts - 1
    feed = TrainFeed(ray.train.get_dataset_shard("train"), cfg.data, engine.device,
                     batch_size=cfg.run.batch_size // world, seed=cfg.run.seed, rank=rank,
                     columns=engine.method.batch_columns, channels_last=engine.channels_last,
                     local_shuffle=not payload.get("shuffled_at_source", False))
    monitor = Monitor(engine, logs=rank == 0, extra_text=stats.skip_text)
    evaluate = evaluator_for(engine)  # the user's labelled images, the held-out scenes, or nothing
    control = control_group()  # host-side (gloo) group for the per-step "have data" flags

    for epoch in range(engine.epoch, cfg.run.epochs):
        engine.epoch = epoch
        if rank == 0:  # before asking for the epoch's data: its augmentations are seeded by the epoch
            stats.set_epoch(epoch)
        monitor.begin_epoch()
        # Every rank must take the same number of steps (collectives inside the step): all
        # stop as soon as one runs out of data, decided on the host one step ahead.
        for crops, columns in monitor.batches(lockstep(feed.epoch(epoch), control, limit=steps_per_epoch)):
            monitor.after_step(engine.train_step(crops, columns))
        report = monitor.end_epoch()
        if rank == 0:
            if evaluate.due(epoch):
                t = time.perf_counter()
                report.update(evaluate(epoch))
                monitor.add_time("eval_s", time.perf_counter() - t)
            report["data"] = stats.get_or_empty()
        save = epoch + 1 == cfg.run.epochs or (epoch + 1) % cfg.run.checkpoint_every_epochs == 0
        if save:
            with tempfile.TemporaryDirectory(prefix="rayssl-ckpt-") as tmp:
                t = time.perf_counter()
                engine.write_checkpoint(tmp)  # collective: the manifest records every rank's file
                monitor.add_time("checkpoint_s", time.perf_counter() - t)
                t = time.perf_counter()
                ray.train.report({**report, "time": dict(monitor.totals)},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp))
                monitor.add_time("checkpoint_s", time.perf_counter() - t)  # the upload: in the next report
            failed_uploads(epoch)
        else:
            ray.train.report({**report, "time": dict(monitor.totals)})
        monitor.epoch_done(save)
