"""Where a run's time goes outside its training steps, and what removes it.

* ``Monitor.totals``: each epoch splits into time in steps and time blocked on data, exactly;
  evaluation and checkpoint time are added on top; the driver's ``time_spent`` turns rank 0's
  totals into the summary's ``time`` block against the wall time after Ray started.
* The built-in scenes arrive in a new global order every epoch (``crop_scenes``), so the
  workers need no shuffle buffer, whose filling delayed every epoch's first batch.
* ``node_threads``: a CPU worker evaluates with the node's cores, then its own count again.
"""

from __future__ import annotations

import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayssl.data.pipeline import crop_scenes
from rayssl.data.scenes import epoch_order, generate_batch
from rayssl.data.ship import ShipToDevice
from rayssl.engine.evaluate import node_threads
from rayssl.engine.monitor import TIME_KEYS, Monitor
from rayssl.runtime.driver import time_spent, time_text


def _fake_engine(batch_size: int = 4) -> SimpleNamespace:
    run = SimpleNamespace(log_every_steps=1000, batch_size=batch_size, epochs=2)
    method = SimpleNamespace(collapse_classes=lambda: None, progress_text=lambda m: "")
    return SimpleNamespace(cfg=SimpleNamespace(run=run), method=method, steps_per_epoch=3, device=torch.device("cpu"),
                           step=0, epoch=0, images_seen=0)


def _slow(n: int, wait_s: float):
    for i in range(n):
        time.sleep(wait_s)
        yield i


def test_monitor_totals_split_each_epoch_into_steps_and_data_waits():
    engine = _fake_engine()
    monitor = Monitor(engine, logs=False)
    assert set(monitor.totals) == set(TIME_KEYS) and not any(monitor.totals.values())
    elapsed = 0.0
    for epoch in range(2):
        engine.epoch = epoch
        monitor.begin_epoch()
        for _ in monitor.batches(_slow(3, 0.02)):
            time.sleep(0.05)  # the step
            engine.step += 1
            monitor.after_step({"loss": torch.tensor(1.0), "lr": 0.1})
        report = monitor.end_epoch()
        elapsed += monitor.elapsed
        assert report["data_wait_s"] >= 3 * 0.02 and report["first_batch_s"] >= 0.02
    t = monitor.totals
    # The epochs' time is steps + waits, exactly; each at least what it slept.
    assert t["steps_s"] + t["data_wait_s"] == pytest.approx(elapsed, rel=1e-9)
    assert t["steps_s"] >= 6 * 0.05 and t["data_wait_s"] >= 6 * 0.02
    assert 2 * 0.02 <= t["first_batch_s"] <= t["data_wait_s"]
    monitor.add_time("eval_s", 1.5)
    monitor.add_time("checkpoint_s", 0.25)
    monitor.add_time("checkpoint_s", 0.25)
    assert t["eval_s"] == 1.5 and t["checkpoint_s"] == 0.5


def test_time_spent_accounts_the_wall_time_after_ray_started():
    metrics = {"time": {"steps_s": 80.0, "data_wait_s": 6.0, "first_batch_s": 4.0, "eval_s": 5.0,
                        "checkpoint_s": 1.0, "not_a_time": 9.0}}
    t = time_spent(metrics, ray_start_s=3.0, after_ray_s=100.0)
    assert t == {"ray_start_s": 3.0, "after_ray_start_s": 100.0, "steps_s": 80.0, "data_wait_s": 6.0,
                 "first_batch_s": 4.0, "eval_s": 5.0, "checkpoint_s": 1.0, "other_s": 8.0,
                 "outside_steps_pct": 20.0}
    assert time_text(t).startswith("time: Ray started in 3.0 s, then 100.0 s, of which 20.0% outside training steps")
    assert "the rest 8.0 s" in time_text(t)
    # A run whose workers reported nothing (stopped before the first epoch) says only the walls;
    # a run on a Ray that was already running says so.
    bare = time_spent(None, None, 10.0)
    assert bare == {"ray_start_s": None, "after_ray_start_s": 10.0, "other_s": 10.0}
    assert time_text(bare) == "time: Ray was running, then 10.0 s"


class _Stats:
    """What ``crop_scenes`` asks of the run's counts: the epoch, and a place for its counts."""

    def __init__(self, epoch: int):
        self._epoch, self.counts = epoch, Counter()

    def epoch(self) -> int:
        return self._epoch

    def add(self, counts, wait=False):
        self.counts.update(counts)


def _epoch_keys(n: int, epoch: int, block: int = 24) -> list[int]:
    stats, keys = _Stats(epoch), []
    for start in range(0, n, block):  # Ray Data's range blocks, read in order
        out = crop_scenes({"id": np.arange(start, min(n, start + block))}, seed=7, size=32,
                          spec=ShipToDevice(None), stats=stats, num_images=n)
        keys += out["key"].tolist()
        want = generate_batch(out["key"].astype(np.int64), seed=7, size=32)["image"]
        np.testing.assert_array_equal(out["image"], want)  # row i carries the scene its key names
    assert stats.counts["seen"] == n
    return keys


def test_scenes_come_in_a_new_global_order_every_epoch():
    n = 100
    e0, e1, again = _epoch_keys(n, 0), _epoch_keys(n, 1), _epoch_keys(n, 0)
    assert sorted(e0) == sorted(e1) == list(range(n))  # every scene once per epoch
    assert e0 == again  # seeded: the same order for the same (seed, epoch)
    assert e0 != e1 and e0 != list(range(n))
    # Global, not within blocks: the first block of an epoch draws from the whole range.
    assert max(e0[:24]) >= 24 and max(e1[:24]) >= 24
    assert epoch_order(n, 7, 0).tolist() == e0


def test_scenes_without_num_images_keep_row_order():
    out = crop_scenes({"id": np.arange(5)}, seed=7, size=32, spec=ShipToDevice(None), stats=_Stats(3))
    assert out["key"].tolist() == [0, 1, 2, 3, 4]


def test_node_threads_lends_the_cores_for_the_duration():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with node_threads(torch.device("cpu")):
            assert torch.get_num_threads() == max(1, len(__import__("os").sched_getaffinity(0)))
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError):
            with node_threads(torch.device("cpu")):
                raise RuntimeError("evaluation failed")
        assert torch.get_num_threads() == 1  # restored after a failure too
        with node_threads(torch.device("meta")):  # not a CPU: nothing changes
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
