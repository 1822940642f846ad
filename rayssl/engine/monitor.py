"""What a training loop tells its user: progress lines, the collapse watch, each epoch's report.

``Monitor`` follows one worker's epochs: the time blocked on each batch (``DataWait``), the
log windows (mean loss, lr, images/s, share of the window spent waiting for data), SwAV's
collapse watch, and the report of an epoch. Only the rank that logs reads values back from
the device, and only at log steps. Pure Python + torch.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import torch

from rayssl.engine.datawait import DataWait
from rayssl.losses import loss_at_uniform

T = TypeVar("T")

__all__ = ["TIME_KEYS", "CollapseWatch", "Monitor", "log"]

# A worker's time, totalled over its epochs (``Monitor.totals``): ``data_wait_s`` includes
# ``first_batch_s``; ``steps_s`` is the epochs' time not spent waiting for data.
TIME_KEYS = ("steps_s", "data_wait_s", "first_batch_s", "eval_s", "checkpoint_s")


def log(msg: str) -> None:
    """One progress line on stderr, ``[rayssl] msg``.

    Not print(): Ray Train patches print() in workers and would emit the line twice.
    """
    sys.stderr.write(f"[rayssl] {msg}\n")
    sys.stderr.flush()


class CollapseWatch:
    """Warns once when the SwAV-style loss stays at ln(K) for several log windows."""

    def __init__(self, num_prototypes: int | None, windows: int = 3, rel_tol: float = 0.01):
        self.num_prototypes, self.windows, self.tol = num_prototypes, windows, rel_tol
        self.uniform = math.log(num_prototypes) if num_prototypes else None
        self.count, self.warned = 0, False

    def update(self, loss: float, step: int) -> str | None:
        if self.uniform is None:
            return None
        self.count = self.count + 1 if loss_at_uniform(loss, self.num_prototypes, self.tol) else 0
        if self.count >= self.windows and not self.warned:
            self.warned = True
            return (
                f"step {step}: loss {loss:.4f} has stayed at ln(K) = {self.uniform:.4f} for {self.count} "
                "log windows: predictions are uniform over prototypes (SwAV collapse). Usual causes: "
                "queue switched on too early, learning rate too high, too few prototypes used, or "
                "prototypes still frozen."
            )
        return None


class Monitor:
    """Progress of one worker's epochs (see the module docstring).

    Args:
        engine: the worker's ``rayssl.engine.Engine`` (its method, counters and config).
        logs: whether this worker writes progress lines (rank 0).
        extra_text: more text for each progress line (e.g. the data pipeline's skip counts).
    """

    def __init__(self, engine, logs: bool, extra_text: Callable[[], str] = lambda: ""):
        self.engine, self.logs, self.extra_text = engine, logs, extra_text
        cfg = engine.cfg
        self.every = cfg.run.log_every_steps
        self.waits = DataWait()  # time blocked on the next batch: is the input pipeline keeping up?
        # "For long": two epochs' worth of log windows (at least 3) with the loss at ln(K).
        self.watch = CollapseWatch(engine.method.collapse_classes(),
                                   windows=max(3, 2 * engine.steps_per_epoch // self.every))
        # Where this worker's time went since it started, each epoch's report carrying the totals
        # so far: in steps, blocked on data (the first batches among it), evaluating, checkpointing.
        self.totals = dict.fromkeys(TIME_KEYS, 0.0)

    def add_time(self, key: str, seconds: float) -> None:
        """Time spent outside the steps (``eval_s``, ``checkpoint_s``), for the next report."""
        self.totals[key] += seconds

    def batches(self, source: Iterable[T]) -> Iterator[T]:
        """``source`` for the epoch just begun, timing each wait for the next batch."""
        return self.waits.wrap(source)

    def begin_epoch(self) -> None:
        self.t0 = self.win_t = time.perf_counter()
        self.steps = self.images = self.win_n = 0
        self.win_loss = torch.zeros((), device=self.engine.device)
        self.first_loss = self.metrics = None
        self.step_row: dict | None = None
        self.waits.take_window()

    def after_step(self, metrics: Mapping[str, torch.Tensor]) -> None:
        """Account for one step's metrics; at log steps, the progress line."""
        e = self.engine
        self.steps += 1
        self.images += e.cfg.run.batch_size
        self.win_loss += metrics["loss"]
        self.win_n += 1
        self.metrics = metrics
        if self.first_loss is None:  # the epoch's first loss: after a resume, the step right after the checkpoint
            self.first_loss = metrics["loss"].detach()
        if not self.logs or not self.log_step():
            return
        mean_loss = (self.win_loss / self.win_n).item()
        win_s = time.perf_counter() - self.win_t
        ips = self.win_n * e.cfg.run.batch_size / win_s
        wait_pct = 100.0 * self.waits.take_window() / win_s
        self.step_row = {"step": e.step, "epoch": round(e.epoch + e.epoch_step / e.steps_per_epoch, 4),
                         "loss": mean_loss, "lr": float(metrics["lr"]), "images_per_s": ips,
                         "data_wait_pct": wait_pct}
        log(f"epoch {e.epoch + 1}/{e.cfg.run.epochs} step {e.epoch_step}/{e.steps_per_epoch} "
            f"loss={mean_loss:.4f} lr={metrics['lr']:.4g} {ips:.1f} img/s data_wait={wait_pct:.0f}%"
            f"{e.method.progress_text(metrics)}{self.extra_text()}")
        warn = self.watch.update(mean_loss, e.step)
        if warn:
            log("WARNING " + warn)
        self.win_loss.zero_()
        self.win_n, self.win_t = 0, time.perf_counter()

    def log_step(self) -> bool:
        """Whether the step just taken is a log step (the same on every rank)."""
        return self.engine.step % self.every == 0

    def take_step_report(self) -> dict:
        """What a log step is reported with: ``{"step_log": row}``, the row (rank 0's; ``{}`` on
        the other ranks) being the log window's step, fractional epoch, mean loss, lr, images/s and
        share of time waiting for data. The trackers write it per step; Tune passes over it."""
        row, self.step_row = self.step_row, None
        return {"step_log": row or {}}

    def mid_epoch_report(self, data: dict) -> dict:
        """What a checkpoint inside an epoch is reported with. It has no ``epoch`` key: the
        trackers and Tune, which count epochs, pass over it; ``data``: rank 0's data counts,
        which a run resumed from this checkpoint carries on from."""
        e = self.engine
        return {"step": e.step, "epoch_in_progress": e.epoch + 1, "epoch_step": e.epoch_step,
                "images_seen": e.images_seen, "data": data}

    def end_epoch(self) -> dict:
        """The epoch's report (what ``ray.train.report`` carries); raises when no batch came.
        An epoch resumed from a checkpoint taken at its last batch has no step left: its report
        then has no loss."""
        e = self.engine
        if self.steps == 0 and e.epoch_step:
            self.elapsed = time.perf_counter() - self.t0
            self.report = {"epoch": e.epoch + 1, "step": e.step, "images_seen": e.images_seen, "loss": None,
                           "images_per_s": 0.0, "data_wait_s": self.waits.epoch_s,
                           "first_batch_s": self.waits.first_batch_s}
            return self.report
        if self.steps == 0:
            raise RuntimeError(
                f"epoch {e.epoch}: no batch reached the workers (global batch {e.cfg.run.batch_size} may exceed "
                "the usable images, or every image was skipped)")
        elapsed = time.perf_counter() - self.t0
        self.report = {
            "epoch": e.epoch + 1,
            "step": e.step,
            "loss": float(self.metrics["loss"].item()),
            "first_loss": float(self.first_loss.item()),
            "images_seen": e.images_seen,
            "images_per_s": self.images / elapsed,
            "lr": self.metrics["lr"],
            # Of the epoch's wall time: blocked on the next batch, and of that the first one.
            "data_wait_s": self.waits.epoch_s,
            "first_batch_s": self.waits.first_batch_s,
        }
        self.totals["steps_s"] += elapsed - self.waits.epoch_s
        self.totals["data_wait_s"] += self.waits.epoch_s
        self.totals["first_batch_s"] += self.waits.first_batch_s or 0.0
        self.elapsed = elapsed
        return self.report

    def epoch_done(self, saved: bool) -> None:
        """The epoch's closing line (rank 0)."""
        if self.logs:
            r = self.report
            loss = "no loss" if r["loss"] is None else f"loss {r['loss']:.4f}"
            log(f"epoch {r['epoch']} done: {self.steps} steps, {loss}, {r['images_per_s']:.1f} img/s, "
                f"{self.waits.epoch_s:.1f} of {self.elapsed:.1f} s waiting for data "
                f"(first batch {self.waits.first_batch_s or 0.0:.1f} s)" + (", checkpoint saved" if saved else ""))
