"""The plain-loop feed of the quality run and of ``experiments/plain_loop.py``: the same scenes and
crops as a run's Ray Data tasks, every scene once per epoch, epochs in order across loader workers."""

from __future__ import annotations

import itertools

import numpy as np
import torch

import rayssl.bench.quality as quality
from rayssl.bench.quality import SceneCrops, cut_batches, epoch_batches
from rayssl.data.multicrop import MultiCropSpec
from rayssl.data.pipeline import crop_scenes
from rayssl.data.scenes import epoch_order, generate_batch

SPEC = MultiCropSpec(sizes=(24, 12), counts=(2, 1), min_scale=(0.5, 0.2), max_scale=(1.0, 0.5))
KEYS = ["crop_0", "crop_1", "crop_2"]


class _Epoch:
    def __init__(self, epoch):
        self._epoch = epoch

    def epoch(self):
        return self._epoch

    def add(self, counts, wait=False):
        pass


def _take(it, n):
    return list(itertools.islice(it, n))


def test_the_chunks_are_the_crops_a_run_cuts_generated_or_not():
    n, seed = 20, 5
    images = generate_batch(range(n), seed=seed, size=32)["image"]
    pre = SceneCrops(images, SPEC, seed, chunk=8)
    fly = SceneCrops(None, SPEC, seed, chunk=8, scenes=(n, seed, 32))
    for a, b in zip(_take(iter(pre), 6), _take(iter(fly), 6)):  # two epochs of 3 chunks
        assert a["epoch"] == b["epoch"] and a["rows"] == b["rows"]
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    # ... and what the pipeline's crop_scenes cuts from the same rows of the same epoch.
    chunk = _take(iter(fly), 4)[3]  # epoch 1's first chunk
    ray_rows = crop_scenes({"id": np.arange(8)}, seed=seed, size=32, spec=SPEC, stats=_Epoch(1), num_images=n)
    assert chunk["epoch"] == 1
    for k in KEYS:
        np.testing.assert_array_equal(chunk[k], ray_rows[k])


def test_loader_workers_share_each_epoch_and_the_round_robin_keeps_epochs_in_order(monkeypatch):
    """Three workers, 7 chunks an epoch: each yields 3 chunks an epoch (one empty where it has
    none left), so the DataLoader's round robin (worker 0, 1, 2, 0, ...) never mixes epochs."""
    n, seed, workers = 50, 1, 3
    streams = []
    for w in range(workers):
        monkeypatch.setattr(quality, "get_worker_info", lambda w=w: type("I", (), {"id": w, "num_workers": workers}))
        it = iter(SceneCrops(None, SPEC, seed, chunk=8, scenes=(n, seed, 32)))
        streams.append(itertools.chain([next(it)], it))  # started: it has read its worker info
    monkeypatch.undo()
    robin = [next(streams[i % workers]) for i in range(workers * 3 * 3)]  # three epochs
    epochs = [c["epoch"] for c in robin]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1, 2}
    for e in range(3):
        rows = [c for c in robin if c["epoch"] == e and c["rows"]]
        assert sum(c["rows"] for c in rows) == n
    batches = list(epoch_batches(iter(robin), 16, KEYS))
    # 50 scenes an epoch, batches of 16: three whole batches per epoch, the 2 left dropped.
    assert [e for e, _ in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(b[0].shape == (16, 24, 24, 3) and b[2].shape == (16, 12, 12, 3) for _, b in batches)


def test_cut_batches_cuts_exact_batches_in_order():
    chunks = [{"x": np.arange(a, b)} for a, b in ((0, 5), (5, 6), (6, 13))]
    got = list(cut_batches(chunks, 4, ["x"]))
    assert [b[0].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # 12 left, dropped
    assert all(isinstance(b[0], torch.Tensor) for b in got)


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    a, b = epoch_order(30, 3, 0), epoch_order(30, 3, 1)
    assert sorted(a.tolist()) == list(range(30)) and a.tolist() != b.tolist()
    assert epoch_order(30, 3, 0).tolist() == a.tolist() and epoch_order(30, 4, 0).tolist() != a.tolist()


def test_the_quality_run_trains_the_epochs_it_is_given_and_scores_them():
    """As experiments/plain_loop.py runs it (scenes generated as the loop goes; the GPU check's
    dry run covers the pregenerated, time-boxed form)."""
    from rayssl.presets import layered_config

    cfg = layered_config({"data": {"scenes_num_images": 32}, "run": {"batch_size": 16, "epochs": 2},
                          "eval": {"num_train_images": 20, "num_test_images": 10},
                          "swav": {"num_prototypes": 16, "projection_hidden_dim": 32, "projection_dim": 16}})
    r = quality.quality_run(cfg, torch.device("cpu"), seconds=None, workers=0, pregenerate=False)
    assert r["epochs"] == 2 and r["steps"] == 4 and r["images_seen"] == 64 and r["pregenerated"] is False
    assert r["calibrated_step_s"] is None and 0 <= r["knn_top1"] <= 1 and 0 <= r["knn_top1_random_init"] <= 1
