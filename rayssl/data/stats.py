"""A run's data counts, summed over every Ray Data task: seen, skipped by reason, converted.

``DataCounts`` is a picklable handle on one Ray actor. The map tasks add their batch's counts
(``report``: fire and forget when nothing was skipped; when something was, wait for the
totals and stop the run with a ``DataError`` once more than ``data.max_bad_fraction`` of the
images seen are bad); the training worker announces each epoch before reading it (the epoch
seeds the augmentations, ``current_epoch``) and shows the skips in its progress lines; the
driver puts the totals in the run's summary. Keys: ``seen``, ``skipped.<reason>``,
``converted.<conversion>``, ``retried`` (storage requests retried, ``rayssl.storage.retrying``)
and ``train.worker_group_starts`` (restarts = starts - 1).
"""

from __future__ import annotations

from collections import Counter

import ray

from rayssl.data.multicrop import sample_generators
from rayssl.data.sources import DataError

__all__ = ["MIN_SEEN_FOR_BAD_CHECK", "PER_PROCESS", "PREEMPTIONS", "RESIZES", "WORKER_STARTS", "WORLD_SIZE", "DataCounts", "augment_generators", "bad_fraction_error",
           "current_epoch", "report"]

# The bad-data check waits for this many images, so a few broken files at the start of
# a stream cannot stop a run.
MIN_SEEN_FOR_BAD_CHECK = 64
# Counts that are not images (a shard is one unit) and so stay out of the bad fraction.
NOT_IMAGE_COUNTS = ("skipped.unreadable_shard", "skipped.storage_error_shard")
# Incremented once per start of the training worker group (counted per process, not carried on resume).
WORKER_STARTS = "train.worker_group_starts"
# Preemption notices the workers of this process received, and the restarts that followed one.
PREEMPTION_NOTICES = "train.preemption_notices"
PREEMPTIONS = "train.preemptions"
# Worker-group starts with another number of workers than the start before (an elastic run
# resized), and that number, kept as a count (the actor only adds).
RESIZES = "train.resizes"
WORLD_SIZE = "train.world_size"
# Counted per process (a --resume starts them again); kept out of the carried counts and the summary.
PER_PROCESS = (WORKER_STARTS, PREEMPTION_NOTICES, PREEMPTIONS, RESIZES, WORLD_SIZE)


@ray.remote(num_cpus=0)
class _CountsActor:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._epoch = 0

    def add(self, counts: dict) -> dict:
        self.counts.update(counts)
        return dict(self.counts)

    def get(self) -> dict:
        return dict(self.counts)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def epoch(self) -> int:
        return self._epoch


class DataCounts:
    """The counts of one run and the epoch its consumer reads (see the module docstring)."""

    def __init__(self) -> None:
        self.actor = _CountsActor.remote()

    def add(self, counts: dict, wait: bool = False) -> dict | None:
        """Add ``counts``; with ``wait``, return the totals after the addition."""
        ref = self.actor.add.remote(dict(counts))
        return ray.get(ref) if wait else None

    def get(self, timeout: float | None = None) -> dict:
        return ray.get(self.actor.get.remote(), timeout=timeout)

    def get_or_empty(self, timeout: float = 10) -> dict:
        """The totals, or {} when the actor does not answer in time: statistics never stop training."""
        try:
            return self.get(timeout)
        except Exception:  # noqa: BLE001
            return {}

    def set_epoch(self, epoch: int) -> None:
        """The consumer calls this (and waits) before it starts reading epoch ``epoch``."""
        ray.get(self.actor.set_epoch.remote(epoch))

    def epoch(self) -> int:
        return int(ray.get(self.actor.epoch.remote()))

    def count_worker_start(self, world_size: int) -> None:
        """One more start of the worker group, of ``world_size`` workers, in this process. A start
        with another number of workers than the last counts as a resize; else a restart after a
        preemption notice (``count_preemption_notice``) not yet matched by one, as a preemption."""
        counts = self.add({WORKER_STARTS: 1}, wait=True)
        before = counts.get(WORLD_SIZE, 0)
        change = {WORLD_SIZE: world_size - before}
        if before and before != world_size:
            change[RESIZES] = 1
        elif counts.get(WORKER_STARTS, 0) > 1 and counts.get(PREEMPTION_NOTICES, 0) > counts.get(PREEMPTIONS, 0):
            change[PREEMPTIONS] = 1
        self.add(change, wait=True)

    def count_preemption_notice(self) -> None:
        """The workers learnt that a node of theirs is about to be preempted."""
        self.add({PREEMPTION_NOTICES: 1}, wait=True)

    def skip_text(self) -> str:
        """`` skipped=N/M`` and `` retried=R`` for a progress line, "" when there are none."""
        counts = self.get_or_empty()
        skipped = sum(v for k, v in counts.items() if k.startswith("skipped."))
        return ((f" skipped={skipped}/{counts.get('seen', 0)}" if skipped else "")
                + (f" retried={counts['retried']}" if counts.get("retried") else ""))


def current_epoch(stats: DataCounts | None) -> int:
    """The epoch the consumer announced with ``DataCounts.set_epoch`` (0 without counts).

    Read once per map batch: Ray Data starts an epoch's tasks only after every training
    worker asked for that epoch (``streaming_split``'s barrier), and rank 0 announces the
    epoch before it asks and only once every worker holds its last batch of the epoch before,
    so every batch an epoch trains on reads that epoch's number (a batch of the epoch before
    made after the announcement is read to the end of that epoch and dropped).
    """
    return 0 if stats is None else stats.epoch()


def augment_generators(seed: int, stats: DataCounts | None, keys) -> list:
    """One augmentation generator per sample from (run seed, epoch, the sample's stable
    key): the crops of an image depend on nothing else -- not on the batch, task, block
    order or worker it lands in -- so runs with the same seed, and a resumed run, see the
    same crops of the same image in the same epoch."""
    return sample_generators(seed, current_epoch(stats), keys)


def bad_fraction_error(totals: dict, max_bad_fraction: float, uri: str = "") -> str | None:
    """The error message when too many of the images seen so far were skipped, else None."""
    seen = int(totals.get("seen", 0))
    skips = {k: v for k, v in totals.items() if k.startswith("skipped.") and k not in NOT_IMAGE_COUNTS}
    bad = sum(skips.values())
    if seen < MIN_SEEN_FOR_BAD_CHECK or bad <= max_bad_fraction * seen:
        return None
    why = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(skips.items()))
    where = f" in {uri}" if uri else ""
    hint = "check the data (or raise data.max_bad_fraction)"
    if max(skips, key=skips.get) == "skipped.too_small":
        hint = ("most images are smaller than data.min_image_side (0: the largest of data.crop_sizes); "
                "use smaller crops or set data.min_image_side")
    return (f"{bad} of {seen} images{where} were unusable ({why}): more than data.max_bad_fraction="
            f"{max_bad_fraction:g}; {hint}")


def report(stats: DataCounts | None, counts: Counter, max_bad_fraction: float = 1.0, uri: str = "") -> None:
    """Send a batch's counts to ``stats``.

    Fire and forget when nothing was skipped (never block the data path for the common
    case); when something was, wait for the totals and stop the run if too much is bad.
    """
    if stats is None or not counts:
        return
    bad = any(k.startswith("skipped.") for k in counts)
    if not bad or max_bad_fraction >= 1.0:
        stats.add(counts)
        return
    msg = bad_fraction_error(stats.add(counts, wait=True), max_bad_fraction, uri)
    if msg:
        raise DataError(msg)
