"""Every registered method, through the one training engine, on CPU: build -> forward ->
backward -> optimiser step -> the benchmark's split -> checkpoint state round trip (the
restored engine takes exactly the step the original takes). A method added to the registry
is covered here without a line of test code of its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import write_scene_pseudo_labels
from rayssl.config import Config, deep_merge
from rayssl.data.scenes import SHAPES
from rayssl.engine import Engine
from rayssl.methods import Method, MethodConfig, get_method, method_names
from rayssl.presets import layered_config
from rayssl.space import Dim

BATCH, IMAGES = 8, 32
SMALL = {  # tiny heads and queues so every method steps in well under a second
    "swav": {"num_prototypes": 16, "projection_hidden_dim": 32, "projection_dim": 16, "queue_length": 16,
             "queue_start_epoch": 0, "freeze_prototypes_iters": 0},
    "mls": {"queue_size": 16, "k": 3, "projection_hidden_dim": 32, "projection_dim": 16},
    "moco": {"queue_size": 16, "projection_hidden_dim": 32, "projection_dim": 16},
}


def _config(name: str, tmp_path) -> Config:
    overrides = {"run": {"method": name, "batch_size": BATCH, "num_workers": 1, "epochs": 2},
                 "data": {"scenes_image_size": 32}, name: SMALL.get(name, {})}
    if "index" in get_method(name).model_cls.batch_columns:
        # A method with per-image state reads a table of the images by index (CDUL: its labels).
        labels = write_scene_pseudo_labels(tmp_path / "labels", list(SHAPES),
                                           np.random.default_rng(0).random((IMAGES, len(SHAPES))).astype("float32"))
        overrides = deep_merge(overrides, {name: {"pseudo_labels": str(labels)}})
    groups = len(layered_config(overrides).data.crop_sizes)
    sizes = [32, 16][:groups]
    return layered_config(deep_merge(overrides, {"data": {"crop_sizes": sizes}}))


def _batch(cfg: Config, seed: int):
    gen = torch.Generator().manual_seed(seed)
    crops = [torch.randn(BATCH, 3, s, s, generator=gen) for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts)
             for _ in range(c)]
    columns = {"index": torch.randperm(IMAGES, generator=gen)[:BATCH]}
    return crops, columns


def _engine(cfg: Config) -> Engine:
    return Engine(cfg, steps_per_epoch=IMAGES // BATCH, device="cpu")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", method_names())
def test_every_method_steps_and_resumes_through_the_engine(name, tmp_path):
    spec = get_method(name)
    assert issubclass(spec.model_cls, Method) and issubclass(spec.config_cls, MethodConfig)
    assert spec.metric and spec.summary and spec.config_cls.section == name
    assert spec.space and all(isinstance(d, Dim) or not isinstance(d, dict) for d in spec.space.values())
    cfg = _config(name, tmp_path)
    engine = _engine(cfg)
    engine.start()
    columns_needed = engine.method.batch_columns
    before = {k: v.detach().clone() for k, v in engine.method.named_parameters()}

    # Steps until every part of the method runs (its queue filled...), each loss finite.
    for i in range(max(2, cfg.method.warmup_steps(BATCH) + 1)):
        engine.epoch = 1
        crops, columns = _batch(cfg, i)
        metrics = engine.train_step(crops, {k: columns[k] for k in columns_needed})
        assert math.isfinite(float(metrics["loss"])) and metrics["lr"] >= 0
    assert engine.step == i + 1
    moved = [k for k, v in engine.method.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in moved), "the optimiser step did not reach the backbone"

    # The benchmark's split of a step runs and reaches the backbone.
    crops, columns = _batch(cfg, 100)
    assert engine.method.backbone_inputs(crops) and engine.method.heads_output(crops).requires_grad

    # Checkpoint round trip: a fresh engine restored from the checkpoint takes the same next step.
    engine.write_checkpoint(str(tmp_path))
    restored = _engine(cfg)
    assert "resumed from checkpoint at epoch 2" in restored.restore(str(tmp_path))
    restored.start()
    assert _same(restored.method.rank_state_dict(), engine.method.rank_state_dict())
    assert _same(restored.method.shared_state_dict(), engine.method.shared_state_dict())
    _restore_on_more_workers(cfg, restored, tmp_path)  # before either takes another step
    # Read onto the host whatever the training device: an engine for another device ("meta"
    # here, whose tensors the CPU generator cannot take, as it cannot take a GPU's) restores the
    # same weights, state and random streams.
    elsewhere = _engine(cfg)
    elsewhere.device = torch.device("meta")
    elsewhere.restore(str(tmp_path))
    assert _same(elsewhere.method.state_dict(), engine.method.state_dict())
    assert _same(elsewhere.method.shared_state_dict(), engine.method.shared_state_dict())
    engine.epoch = restored.epoch = 1
    a = engine.train_step(crops, {k: columns[k] for k in columns_needed})
    b = restored.train_step(crops, {k: columns[k] for k in columns_needed})
    assert torch.equal(a["loss"], b["loss"]) and restored.step == engine.step
    for (k, v), (_, w) in zip(engine.method.state_dict().items(), restored.method.state_dict().items()):
        assert torch.equal(v, w), k


def _restore_on_more_workers(cfg: Config, one: Engine, directory) -> None:
    """An elastic run grown from 1 worker to 2 restores the 1-worker checkpoint: a state every
    rank held alike (MLS/MoCo's global queue) reaches both ranks; a worker's share of one
    (SwAV's per-worker queue) starts empty; the weights and shared state come whole."""
    grown = [Engine(cfg, steps_per_epoch=IMAGES // BATCH, device="cpu", world_size=2, rank=r) for r in (0, 1)]
    notes = [e.restore(str(directory)) for e in grown]
    # The ranks' random streams were not in a 1-worker checkpoint: each is seeded anew, by its rank
    # and the step, so the two differ and neither replays a fresh run's stream.
    fresh = Engine(cfg, steps_per_epoch=IMAGES // BATCH, device="cpu", world_size=2, rank=0)
    draws = []
    for e in (*grown, fresh):
        torch.manual_seed(0)  # whatever stream the process had
        e.seed_streams()
        draws.append(torch.rand(8))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    saved = one.method.rank_state_dict()
    for e, note in zip(grown, notes):
        assert _same(e.method.state_dict(), one.method.state_dict())
        assert _same(e.method.shared_state_dict(), one.method.shared_state_dict())
        if not saved:
            assert "restarted empty" not in note
        elif e.method.replicated_rank_state:
            assert _same(e.method.rank_state_dict(), saved) and "restarted empty" not in note
        else:
            assert not _same(e.method.rank_state_dict(), saved) and "restarted empty" in note


def test_registration_refuses_a_second_method_of_the_same_name():
    from rayssl.methods import register
    from rayssl.methods.swav import SwAVConfig

    with pytest.raises(ValueError, match="registered twice"):
        register("swav", config=SwAVConfig, metric="knn_top1", summary="again")(type("Again", (Method,), {}))
