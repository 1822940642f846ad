"""The function Ray Train's ``TorchTrainer`` runs on every worker: Ray glue around the engine.

Ray enters only here: the worker's rank and device, its dataset shard, the checkpoint to
resume from, and the reports (``rayssl.runtime.reports``: ``ray.train.report``, called the
same number of times on every rank; in an in-process run, ``run.num_workers=0``, the function
runs in the driver and rayssl stores the reports itself). The model, the step, the progress
and the evaluation are ``rayssl.engine`` (pure PyTorch).
"""

from __future__ import annotations

import tempfile
import time

import ray.train
import ray.train.torch
import torch

from rayssl.checkpoint import CheckpointError
from rayssl.config import Config
from rayssl.data.feed import TrainFeed
from rayssl.engine import Engine, Monitor, control_group, lockstep, log
from rayssl.modules.seeding import untouched_streams
from rayssl.runtime.evaluation import evaluator_for, online_probe
from rayssl.runtime.internals import quiet_report_lines
from rayssl.runtime.reports import RayReports
from rayssl.storage import StorageError
from rayssl.storage.checked import take_write_failures

__all__ = ["restore", "start_epoch", "train_loop_per_worker"]


def failed_uploads() -> None:
    """Stop the run when a file of a checkpoint already reported did not reach the store (after
    the storage retries): Ray Train's upload does not notice a failed close. The checkpoint
    stays incomplete (``verify_checkpoint_dir``) and ``--resume`` passes over it. With
    asynchronous uploads a failure is found at the next checkpoint or at the end of the run."""
    failed = take_write_failures()
    if failed:
        path, exc = failed[0]
        raise StorageError(f"a checkpoint did not reach the store: writing {path} failed after the retries "
                           f"({type(exc).__name__}: {exc}); it is incomplete, and --resume continues from the "
                           f"previous complete checkpoint")


class Checkpoints:
    """When and how one worker checkpoints: at epoch ends (``run.checkpoint_every_epochs``),
    every ``run.checkpoint_every_steps`` inside an epoch, and just in time when Ray Train says a
    node of the run is about to be preempted (asked every ``run.preemption_check_every_steps``,
    a collective). Uploads are asynchronous (``run.checkpoint_upload``) except the run's last
    checkpoint and a just-in-time one, which must be stored before the node goes."""

    def __init__(self, engine: Engine, monitor: Monitor, on_notice=lambda: None, reports=None):
        self.engine, self.monitor, self.run, self.on_notice = engine, monitor, engine.cfg.run, on_notice
        self.reports = reports or RayReports()  # rayssl.runtime.reports: Ray Train's, or an in-process run's
        self.preempted: set[str] = set()  # nodes a just-in-time checkpoint was written for
        self.preemption_at_epoch_end = False

    def _preemption_news(self) -> bool:
        """Collective (every rank asks at the same steps): a node not yet checkpointed for is going."""
        e, ask = self.engine, self.run.preemption_check_every_steps
        if not ask or e.step % ask:
            return False
        info = ray.train.get_preemption_info()
        if info is None or set(info.preempted_node_ids) <= self.preempted:
            return False
        self.preempted |= set(info.preempted_node_ids)
        self.on_notice()
        if e.rank == 0:
            log(f"node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} (ranks {info.preempted_ranks}) "
                f"about to be preempted: just-in-time checkpoint at step {e.step}")
        return True

    def after_step(self) -> str | None:
        """Why to checkpoint inside the epoch after the step just taken (the same on every rank)."""
        e = self.engine
        at_end = e.epoch_step >= e.steps_per_epoch  # then the epoch's own checkpoint follows
        if self._preemption_news():
            self.preemption_at_epoch_end = at_end
            return None if at_end else "preemption"
        every = self.run.checkpoint_every_steps
        return "steps" if every and not at_end and e.step % every == 0 else None

    def at_epoch_end(self) -> str | None:
        """Why to checkpoint at the end of the epoch just trained, or None."""
        epochs = self.engine.epoch + 1
        if self.preemption_at_epoch_end:
            self.preemption_at_epoch_end = False
            return "preemption"
        return "epoch" if epochs == self.run.epochs or epochs % self.run.checkpoint_every_epochs == 0 else None

    def save(self, metrics: dict, *, reason: str, mid_epoch: bool) -> None:
        """Collective: write the checkpoint and report it with ``metrics`` (rank 0's count)."""
        self.report(self.write(reason=reason, mid_epoch=mid_epoch), metrics)

    def write(self, *, reason: str, mid_epoch: bool) -> tuple[str, bool]:
        """Collective: every rank writes its files of the checkpoint; ``report`` hands them over.
        At an epoch's end this comes before rank 0 evaluates, so the other ranks do not wait for
        the evaluation inside the checkpoint's collective (NCCL's watchdog would end them after
        its 30 minutes); they wait in ``report``, Ray Train's barrier, which has no such limit."""
        e = self.engine
        last = not mid_epoch and e.epoch + 1 == self.run.epochs
        failed_uploads()  # an earlier asynchronous upload that failed stops the run here
        directory = tempfile.mkdtemp(prefix="rayssl-ckpt-")  # Ray Train deletes it once uploaded
        t = time.perf_counter()
        e.write_checkpoint(directory, mid_epoch=mid_epoch, reason=reason)
        self.monitor.add_time("checkpoint_s", time.perf_counter() - t)
        return directory, last or reason == "preemption" or self.run.checkpoint_upload == "sync"

    def report(self, written: tuple[str, bool], metrics: dict) -> None:
        """Report the checkpoint ``write`` wrote, with ``metrics`` (not a collective of torch's)."""
        directory, wait = written
        t = time.perf_counter()
        self.reports.report({**metrics, "time": dict(self.monitor.totals)}, directory, wait)
        self.monitor.add_time("checkpoint_s", time.perf_counter() - t)  # the upload: in the next report
        if wait:
            failed_uploads()


def restore(engine: Engine, checkpoint, rank: int) -> None:
    """Continue ``engine`` from the ``ray.train.Checkpoint`` Ray Train (or an in-process run) restored."""
    with checkpoint.as_directory() as directory:
        try:
            note = engine.restore(directory)  # verifies the manifest first
        except CheckpointError as exc:  # e.g. the newest upload failed, then a worker restarted
            raise CheckpointError(f"Ray Train restored {checkpoint.path}: {exc}; start the run again with "
                                  "--resume: it passes over incomplete checkpoints") from None
    if rank == 0:
        log(note)


def start_epoch(feed: TrainFeed, stats, epoch: int, rank: int, skip: int = 0) -> int:
    """Start ``epoch``'s pipeline now (``TrainFeed.start``; ``skip``: batches already trained on),
    rank 0 announcing it first: its rows' augmentations are seeded by it. Every rank calls it at
    the same point: a dataset shard starts an epoch once all have asked. Returns ``epoch``."""
    if rank == 0:
        stats.set_epoch(epoch)
    feed.start(epoch, skip)
    return epoch


def train_loop_per_worker(payload: dict) -> None:
    """``payload``: ``config`` (``Config.to_dict()``), ``steps_per_epoch``, the run's ``stats``
    (``rayssl.data.stats.DataCounts``) and ``shuffled_at_source`` (``TrainData``'s)."""
    quiet_report_lines()  # rayssl's own progress line says it
    cfg = Config.from_dict(payload["config"])
    steps_per_epoch, stats = payload["steps_per_epoch"], payload["stats"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Asked for before the engine is built: rank 0's call starts Ray Data's split coordinator (a
    # process of its own), which then starts while the model is built rather than after it.
    shard = ray.train.get_dataset_shard("train")
    # an in-process run: the driver's choice (Ray Train's local mode takes CUDA whenever it is there)
    device = torch.device(payload["device"]) if payload.get("device") else ray.train.torch.get_device()
    reports = payload.get("reports") or RayReports()  # an in-process run's own (run.num_workers=0)
    checkpoint = reports.restored()
    feed = TrainFeed(shard, cfg.data, device, batch_size=cfg.run.batch_size // world, seed=cfg.run.seed, rank=rank,
                     local_shuffle=not payload.get("shuffled_at_source", False))
    announced = None  # the epoch whose pipeline was started before its loop began
    if checkpoint is None:  # a fresh start: epoch 0's pipeline starts while the engine is built
        announced = start_epoch(feed, stats, 0, rank)
    engine = Engine(cfg, steps_per_epoch, device, world_size=world, rank=rank)
    feed.layout(engine.method.batch_columns, engine.channels_last)
    if checkpoint is not None:
        restore(engine, checkpoint, rank)
    engine.start()
    if rank == 0:  # restarts = starts - 1 - preemptions - resizes
        stats.count_worker_start(world)
        if cfg.run.elastic:
            log(f"{world} workers ({cfg.run.workers_text} allowed): {cfg.run.batch_size // world} images each "
                f"per step, global batch {cfg.run.batch_size}")
    monitor = Monitor(engine, logs=rank == 0, extra_text=stats.skip_text)
    evaluate = evaluator_for(engine)  # the user's labelled images, the held-out scenes, or nothing
    probe = online_probe(engine) if rank == 0 else None  # eval.online_probe: a linear head beside training
    control = control_group()  # host-side (gloo) group for the per-step "have data" flags
    checkpoints = Checkpoints(engine, monitor, stats.count_preemption_notice if rank == 0 else lambda: None, reports)

    counted: dict = {}  # rank 0: the data counts when the next epoch's pipeline started
    for epoch in range(engine.epoch, cfg.run.epochs):
        engine.epoch, skip = epoch, engine.epoch_step  # skip > 0: resumed from inside this epoch
        if announced != epoch:  # not started during the step before (a resumed or restarted run)
            announced = start_epoch(feed, stats, epoch, rank, skip)
        monitor.begin_epoch()
        # Every rank must take the same number of steps (collectives inside the step): all
        # stop as soon as one runs out of data, decided on the host one step ahead.
        for crops, columns in monitor.batches(lockstep(feed.epoch(epoch, skip), control,
                                                       limit=steps_per_epoch - skip)):
            if engine.epoch_step + 1 == steps_per_epoch and epoch + 1 < cfg.run.epochs:
                # The epoch's last batch: lockstep yields it once every rank has taken its own, so
                # every row this epoch trains on is made. The next epoch's pipeline starts now and
                # makes its first batch while this step, the checkpoint and the evaluation run.
                counted = stats.get_or_empty() if rank == 0 else {}  # before the next epoch's rows add to them
                announced = start_epoch(feed, stats, epoch + 1, rank)
            monitor.after_step(engine.train_step(crops, columns))
            if probe is not None:
                probe.step()
            if monitor.log_step():  # the step's progress to the trackers, live (every rank reports)
                reports.report(monitor.take_step_report())
            reason = checkpoints.after_step()
            if reason:
                checkpoints.save(monitor.mid_epoch_report(stats.get_or_empty() if rank == 0 else {}),
                                 reason=reason, mid_epoch=True)
        report = monitor.end_epoch()
        reason = checkpoints.at_epoch_end()
        written = checkpoints.write(reason=reason, mid_epoch=False) if reason else None  # before evaluating
        if rank == 0:
            t = time.perf_counter()
            with untouched_streams(engine.device):
                report.update(probe.score() if probe is not None else {})
                report.update(evaluate.at_epoch_end(epoch))  # due, started beside training, or finished
            monitor.add_time("eval_s", time.perf_counter() - t)
            report["data"] = counted if announced == epoch + 1 else stats.get_or_empty()
        if written:
            checkpoints.report(written, report)
        else:
            reports.report({**report, "time": dict(monitor.totals)})
        monitor.epoch_done(reason is not None)
        engine.epoch_step = 0
    feed.close()  # the last epoch's pipeline shut down now, not when the garbage collector finds it
