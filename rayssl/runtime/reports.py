"""Where a worker's reports and checkpoints go: Ray Train, or (an in-process run) rayssl itself.

A run on Ray Train workers reports with ``ray.train.report``: Ray Train stores each checkpoint
under the run's output (``checkpoint_<time>``, its snapshot naming the ones kept), hands every
report to the run's callbacks in its controller, and gives a restarted or resumed worker the
newest checkpoint. An in-process run (``run.num_workers=0``: Ray Train's local mode, the training
function in the driver) has none of that in Ray 2.60, which keeps only the last report; there
``InProcessReports`` does the same three things here: it copies each checkpoint to
``<output>/checkpoint_<time>`` (the reported metrics beside it in ``report.json``), keeps the
newest ``run.keep_checkpoints``, hands every report to the callbacks, and on ``--resume``
restores the newest complete checkpoint of the output.
"""

from __future__ import annotations

import datetime
import json
import os
import posixpath
import shutil
import sys
from typing import Sequence

import ray.train
from ray.train import CheckpointUploadMode

from rayssl.checkpoint import MANIFEST_FILE, by_progress, checkpoint_dirs, progress
from rayssl.storage import S3Options, filesystem, pyarrow_filesystem

__all__ = ["InProcessReports", "RayReports", "REPORT_FILE", "fsspec_of", "newest_checkpoint"]

REPORT_FILE = "report.json"  # an in-process checkpoint's reported metrics (what resume carries on)


def _further(a, b):
    """Of two ``ray.train.Checkpoint``s (either may be None), the one training had gone further at."""
    if a is None or b is None:
        return a or b
    at = [progress(fsspec_of(c), c.path) for c in (a, b)]
    return a if at[0] >= at[1] else b


class RayReports:
    """Reports through Ray Train (a run on Ray Train workers). ``restore``: on ``--resume``, an
    in-process part of the run's newest checkpoint (``resume_from``), restored when training had
    gone further at it than at Ray Train's (whose snapshot does not list it)."""

    def __init__(self, restore: str | None = None, options: S3Options | None = None):
        self.restore, self.options = restore, options

    def restored(self):
        """The checkpoint this worker starts from, or None."""
        return _further(ray.train.get_checkpoint(), _checkpoint(self.restore, self.options))

    def report(self, metrics: dict, directory: str | None = None, wait: bool = True) -> None:
        """Report ``metrics``, with the checkpoint written in ``directory`` (uploaded, then deleted
        there; ``wait``: before this returns)."""
        if directory is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_upload_mode=CheckpointUploadMode.SYNC if wait else CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)


def newest_checkpoint(output: str, options: S3Options | None = None) -> tuple[str, dict] | None:
    """(URI, reported metrics) of the newest complete checkpoint an in-process run stored under
    ``output`` (one with its ``report.json``), or None. Ray Train's checkpoints have none: its
    snapshot holds their metrics, and names the ones it registered (``resume_point``)."""
    fs, root = filesystem(output, options)
    try:
        complete = _complete(fs, root)
    except FileNotFoundError:  # no output yet; any other storage error is the caller's to see
        return None
    for path in reversed(complete):
        try:
            metrics = json.loads(fs.cat_file(f"{path}/{REPORT_FILE}"))
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            continue
        return f"{output.rstrip('/')}/{posixpath.basename(path)}", metrics
    return None


class InProcessReports:
    """Reports of an in-process run (``run.num_workers=0``), stored and handed on here.

    ``callbacks``: the run's Ray Train callbacks; each report goes to their ``after_report`` as
    Ray Train's controller would hand it (one worker's metrics in a list). ``restore``: the
    checkpoint URI to start from (``newest_checkpoint``), or None."""

    def __init__(self, output: str, options: S3Options | None, keep: int, callbacks: Sequence = (),
                 restore: str | None = None, reported: dict | None = None):
        self.output, self.options, self.keep = output.rstrip("/"), options, keep
        self.callbacks, self.restore = list(callbacks), restore
        # the newest checkpoint and the last report: at first the restored ones (``reported``: the
        # metrics reported with it), so a resumed run with nothing left to train still names them
        self.last_checkpoint: str | None = restore
        self.last_metrics: dict = dict(reported or {})

    def restored(self):
        return _checkpoint(self.restore, self.options)

    def report(self, metrics: dict, directory: str | None = None, wait: bool = True) -> None:
        """As ``RayReports.report``; the checkpoint is always stored before this returns."""
        checkpoint, self.last_metrics = None, metrics
        if directory is not None:
            self.last_checkpoint = self._store(directory, metrics)
            checkpoint = _checkpoint(self.last_checkpoint, self.options)
        for callback in self.callbacks:
            try:
                callback.after_report(None, [metrics], checkpoint)
            except Exception as exc:  # noqa: BLE001 - the run's callbacks record; they never stop training
                sys.stderr.write(f"[rayssl] WARNING callback {type(callback).__name__}: {type(exc).__name__}: {exc}\n")

    def _store(self, directory: str, metrics: dict) -> str:
        """Copy the checkpoint in ``directory`` to the output, then delete it there; keep the newest
        ``keep`` checkpoints of the output. The metrics go in first: the manifest, written last
        by the engine and copied last, is what makes a checkpoint complete."""
        with open(f"{directory}/{REPORT_FILE}", "w") as f:
            json.dump(metrics, f, default=str)
        name = "checkpoint_" + datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        fs, root = filesystem(self.output, self.options)
        dest = f"{root.rstrip('/')}/{name}"
        fs.makedirs(dest, exist_ok=True)
        for entry in sorted(_files(directory), key=lambda e: (e == MANIFEST_FILE, e)):  # the manifest last
            fs.put_file(f"{directory}/{entry}", f"{dest}/{entry}")
        shutil.rmtree(directory, ignore_errors=True)
        for old in _complete(fs, root)[:-self.keep]:  # an incomplete one is left as it is, as --resume does
            if old != dest:
                fs.rm(old, recursive=True)
        return f"{self.output}/{name}"


def _complete(fs, root: str) -> list[str]:
    """The complete ``checkpoint_*`` directories under ``root``, in the order of ``progress``."""
    return by_progress(fs, checkpoint_dirs(fs, root))


def fsspec_of(checkpoint) -> object:
    """The fsspec filesystem of a ``ray.train.Checkpoint`` (its pyarrow one, wrapped)."""
    import fsspec.implementations.arrow as arrow

    return arrow.ArrowFSWrapper(checkpoint.filesystem)


def _checkpoint(uri: str | None, options: S3Options | None):
    if uri is None:
        return None
    fs, root = filesystem(uri, options)
    return ray.train.Checkpoint(root, filesystem=pyarrow_filesystem(fs))


def _files(directory: str) -> list[str]:
    out = []
    for here, _, names in os.walk(directory):
        rel = os.path.relpath(here, directory)
        out += [n if rel == "." else f"{rel}/{n}" for n in names]
    return out

