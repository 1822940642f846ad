"""Ray Train callbacks of a run: the metrics recorder, and the stop on a non-finite loss.

Both run in the Ray Train controller, which sees every worker's reports and failures.
"""

from __future__ import annotations

import sys

from ray.train import UserCallback

from rayssl.runtime.errors import wrapped_error_message
from rayssl.viz.tracking import RunRecorder

__all__ = ["RunTracker", "StopOnNonFinite"]


class RunTracker(UserCallback):
    """Hands rank 0's report of every epoch to a ``rayssl.viz.tracking.RunRecorder``
    (``metrics.jsonl``, ``curves.png``, TensorBoard, MLflow)."""

    def __init__(self, recorder: RunRecorder):
        self.recorder = recorder

    def after_report(self, run_context, metrics, checkpoint):
        try:
            self.recorder.record(metrics[0] if metrics else {})
        except Exception as exc:  # noqa: BLE001 - pictures and trackers must never stop training
            sys.stderr.write(f"[rayssl] WARNING could not record metrics: {type(exc).__name__}: {exc}\n")


class StopOnNonFinite(UserCallback):
    """Ends the run when a worker failed on a non-finite loss or code.

    Ray Train retries a worker's FloatingPointError like a dead worker, but a NaN recurs
    from the same checkpoint with the same data: retrying would only spend --max-failures.
    An error raised in a callback is a controller error, which Ray Train never retries.
    """

    def after_exception(self, run_context, worker_exceptions):
        for rank in sorted(worker_exceptions):
            msg = wrapped_error_message(worker_exceptions[rank], FloatingPointError)
            if msg:
                raise FloatingPointError(f"{msg} (worker {rank}; not retried: it would recur)")
