"""Every use of Ray's internals, in one file, with the Ray version it was written against.

Ray 2.60 has no public API for five things rayssl needs; each is here and nowhere else,
and ``tests/test_ray_internals.py`` fails loudly when the installed Ray changes what is read:

* ``ray.init(_node_ip_address=...)``: the only way to keep a local Ray on loopback (a laptop
  run needs no network; without it Ray binds the machine's address).
* ``ray._private.state``: the autoscaler's configuration, i.e. the nodes and resources a
  ``ray up`` cluster can scale to (its GPU workers start from zero: sizing from
  ``ray.cluster_resources()`` alone would train on the head's CPUs).
* Ray Train V2's checkpoint snapshot (``<run>/checkpoint_manager_snapshot.json``): Ray resumes
  a run from the checkpoint it lists as latest, without looking inside it, and refuses to
  start when a listed directory is gone. ``resume_point`` verifies each listed checkpoint
  against rayssl's manifest and rewrites the snapshot without the incomplete ones, so
  ``--resume`` continues from the newest complete checkpoint.
* Ray Train's controller poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default): the
  controller learns that its workers started or finished at its next poll. A local Ray that
  rayssl starts is started with 0.5 s (``local_environment``), unless the user set it; a
  cluster keeps its own.
* Ray Train's per-report log line, a logger named after the file that writes it
  (``ray/train/v2/_internal/execution/context.py``): every worker logs each report's whole
  metrics at INFO, a line per worker at every log step, next to rayssl's own progress line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import ray

from rayssl.checkpoint import CheckpointError, verify_checkpoint_dir
from rayssl.engine.monitor import log
from rayssl.storage import S3Options, exists, filesystem, read_text, write_text

RAY_VERSION_WRITTEN_AGAINST = "2.60.0"

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of registered checkpoints
# What resume_point reads and rewrites in it (the fields of Ray Train's _CheckpointManagerState).
SNAPSHOT_KEYS_READ = ("checkpoint_results", "checkpoint_report_indices", "latest_checkpoint_result")
SNAPSHOT_KEYS_FILTERED = ("pending_training_results", "pending_validation_specs", "validated_checkpoint_dir_names",
                          "timed_out_validation_checkpoint_dir_names", "failed_validation_checkpoint_dir_names")
RESULT_KEYS_READ = ("checkpoint_dir_name", "metrics")  # in each checkpoint result

__all__ = ["RAY_VERSION_WRITTEN_AGAINST", "REPORT_LOGGER_FILE", "SNAPSHOT_FILE", "autoscaler_capacity",
           "local_environment", "local_init_options", "quiet_report_lines", "resume_point"]

REPORT_LOGGER_FILE = os.path.join("ray", "train", "v2", "_internal", "execution", "context.py")


def local_init_options() -> dict:
    """``ray.init`` keywords that keep a local Ray on loopback."""
    return {"_node_ip_address": "127.0.0.1"}


# Read by Ray Train's controller from its own environment, which a local Ray's processes take
# from the process that started it.
TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


@contextmanager
def local_environment() -> Iterator[None]:
    """The environment to start a local Ray in: Ray Train's controller polls its workers every
    0.5 s, not 2 s (a run's start and end are seen sooner; measured in docs/performance.md).
    A value the user set is kept; this process's environment is as it was afterwards."""
    if TRAIN_POLL_ENV in os.environ:
        yield
        return
    os.environ[TRAIN_POLL_ENV] = LOCAL_TRAIN_POLL_S
    try:
        yield
    finally:
        os.environ.pop(TRAIN_POLL_ENV, None)


def quiet_report_lines() -> None:
    """In a training worker: drop Ray Train's INFO line for every report (its whole metrics);
    warnings and errors of that logger still show."""
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(REPORT_LOGGER_FILE):
            logging.getLogger(name).setLevel(logging.WARNING)


def autoscaler_capacity() -> tuple[dict, int] | None:
    """(most resources, most nodes) the autoscaler may bring up, or None without an autoscaler."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        most = state.get_max_resources_from_cluster_config() if config is not None else None
    except Exception:  # an older or unusual cluster: what is there now is what we size for
        return None
    if config is None or not config.node_group_configs:
        return None
    counts = [g.max_count for g in config.node_group_configs]
    return dict(most or {}), (sys.maxsize if -1 in counts else sum(counts))


def _check_snapshot(snap: dict, uri: str) -> None:
    missing = [k for k in SNAPSHOT_KEYS_READ if k not in snap]
    results = snap.get("checkpoint_results") or []
    missing += sorted({k for r in results for k in RESULT_KEYS_READ if k not in r})
    if missing:
        raise CheckpointError(
            f"--resume: {uri} is not in the format rayssl reads (written against Ray {RAY_VERSION_WRITTEN_AGAINST}, "
            f"running Ray {ray.__version__}; missing {', '.join(missing)}): resume with the Ray version that "
            "wrote the run")


def resume_point(output: str, options: S3Options | None = None) -> dict | None:
    """On --resume, make Ray Train restore the newest *complete* checkpoint under ``output``.

    Each checkpoint the snapshot lists is verified (``verify_checkpoint_dir``); incomplete ones
    are dropped from the snapshot, which is rewritten with the newest complete one as latest.
    Their directories are left in place, untouched, and named in the log. Returns the
    snapshot's record of the checkpoint that will be resumed from (its ``checkpoint_dir_name``
    and the ``metrics`` reported with it); None when there is no snapshot or no complete
    checkpoint is left (the run then starts from epoch 0, with a warning).
    """
    base = output.rstrip("/")
    snapshot_uri = f"{base}/{SNAPSHOT_FILE}"
    if not exists(snapshot_uri, options):
        return None
    snap = json.loads(read_text(snapshot_uri, options))
    _check_snapshot(snap, snapshot_uri)
    fs, root = filesystem(base, options)
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
    for key in SNAPSHOT_KEYS_FILTERED[2:]:
        if key in snap:
            snap[key] = [n for n in snap[key] if n not in bad]
    write_text(snapshot_uri, json.dumps(snap), options)
    if newest is None:
        log(f"--resume: WARNING no complete checkpoint in {base}; training starts again from epoch 0")
        return None
    log(f"--resume: resuming from {base}/{newest['checkpoint_dir_name']}")
    return newest
