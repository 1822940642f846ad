"""The online linear probe (``eval.online_probe``, ``rayssl.engine.probe``), without Ray.

The backbone's update is bit-identical with the probe on and off (the probe reads features
without gradients, in eval mode, from its own generator); the head learns (its loss on the
labelled split falls); its score is the top-1 / macro mAP an independent computation gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayssl.config import ConfigError
from rayssl.data.scenes import SHAPES
from rayssl.engine import Engine
from rayssl.engine.probe import LabelledImages, OnlineProbe
from rayssl.eval.features import extract_features, scenes_eval_sets
from rayssl.eval.metrics import mean_average_precision
from rayssl.presets import layered_config

BATCH, SIZE = 8, 32


def _config(method: str = "swav"):
    small = {"swav": {"num_prototypes": 16, "projection_hidden_dim": 32, "projection_dim": 16, "queue_length": 16,
                      "queue_start_epoch": 0, "freeze_prototypes_iters": 0},
             "mls": {"queue_size": 16, "k": 3, "projection_hidden_dim": 32, "projection_dim": 16}}[method]
    overrides = {"run": {"method": method, "batch_size": BATCH, "num_workers": 1, "epochs": 1},
                 "data": {"scenes_image_size": SIZE}, method: small,
                 "model": {"backbone": "timm:test_resnet", "small_stem": False}}  # conftest.TEST_BACKBONE
    groups = len(layered_config(overrides).data.crop_sizes)
    overrides["data"]["crop_sizes"] = [SIZE, 16][:groups]
    return layered_config(overrides)


def _sets(n_train=48, n_test=24, multilabel=False):
    train, test = scenes_eval_sets(0, SIZE, n_train, n_test)
    key = "labels" if multilabel else "label"
    return LabelledImages(train["image"], train[key], len(SHAPES)), LabelledImages(test["image"], test[key], len(SHAPES))


def _batches(cfg, n: int):
    gen = torch.Generator().manual_seed(7)
    return [[torch.randn(BATCH, 3, s, s, generator=gen) for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts)
             for _ in range(c)] for _ in range(n)]


def _train(cfg, batches, with_probe: bool):
    engine = Engine(cfg, steps_per_epoch=len(batches), device="cpu")
    engine.start()
    probe = None
    if with_probe:
        train, test = _sets()
        probe = OnlineProbe(engine.method.backbone, train, test, SIZE, "cpu", batch_size=16, lr=1e-2, seed=0)
    for crops in batches:
        engine.train_step(crops, {})
        if probe is not None:
            probe.step()
    state = {k: v.detach().clone() for k, v in engine.method.state_dict().items()}
    return state, engine.optimizer.state_dict(), torch.get_rng_state(), probe


@pytest.mark.parametrize("method", ["swav", "mls"])
def test_the_backbone_update_is_bit_identical_with_the_probe_on_and_off(method):
    cfg = _config(method)
    batches = _batches(cfg, 4)
    off, opt_off, rng_off, _ = _train(cfg, batches, with_probe=False)
    on, opt_on, rng_on, probe = _train(cfg, batches, with_probe=True)
    assert probe is not None and off.keys() == on.keys()
    changed = [k for k in off if not torch.equal(off[k], on[k])]
    assert not changed, f"the probe changed {changed[:5]}"
    # batch-norm running statistics are among the compared buffers, and they did move in training
    assert any("running_mean" in k for k in off)
    assert torch.equal(rng_off, rng_on)  # the training RNG stream is untouched
    assert len(opt_on["state"]) == len(opt_off["state"])
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(opt_off["state"].values(), opt_on["state"].values()) if "momentum_buffer" in a)


def _full_loss(probe: OnlineProbe, sets: LabelledImages) -> float:
    with torch.no_grad():
        return float(probe._loss(probe.head(probe._features(sets.images)), sets.targets))


@pytest.mark.parametrize("multilabel", [False, True])
def test_the_head_learns_and_its_score_is_the_independent_one(multilabel):
    torch.manual_seed(0)
    cfg = _config()
    backbone = Engine(cfg, steps_per_epoch=1, device="cpu").method.backbone
    train, test = _sets(multilabel=multilabel)
    probe = OnlineProbe(backbone, train, test, SIZE, "cpu", batch_size=16, lr=1e-2, seed=0)
    assert probe.metric == ("probe_map" if multilabel else "probe_top1")
    before = _full_loss(probe, train)
    for _ in range(200):  # the test ResNet's features: a head learns more slowly than on ResNet-18's
        probe.step()
    assert _full_loss(probe, train) < 0.9 * before
    # The score, recomputed from the backbone's features and the head's weights.
    feats = extract_features(backbone, test.images, SIZE, "cpu")
    logits = feats @ probe.head.weight.detach().T + probe.head.bias.detach()
    if multilabel:
        expected = mean_average_precision(logits, torch.as_tensor(test.targets).float())
    else:
        expected = float((logits.argmax(1).numpy() == test.targets).mean())
    assert probe.score()[probe.metric] == pytest.approx(expected, abs=1e-6)


def test_the_probe_needs_labelled_images_and_sane_settings():
    with pytest.raises(ConfigError, match="eval.online_probe: needs labelled images: add --eval-data"):
        layered_config({"data": {"source": "/data/photos"}, "eval": {"online_probe": True}})
    assert layered_config({"eval": {"online_probe": True}}).eval.online_probe  # the scenes carry labels
    with pytest.raises(ConfigError, match="eval.online_probe_lr"):
        layered_config({"eval": {"online_probe_lr": 0}})
    with pytest.raises(ValueError, match="3 images for 2 targets"):
        LabelledImages(np.zeros((3, 8, 8, 3), np.uint8), np.zeros(2), 4)
