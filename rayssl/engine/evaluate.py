"""The evaluation a run reports at the end of an epoch (pure PyTorch).

On held-out labelled scenes (streams disjoint from the training scenes): the method's metric
(``Method.evaluate``: kNN top-1 for SwAV, a linear probe's mAP for MLS/MoCo, the classifier's
own mAP for CDUL) and, once per run, the same metric for a randomly initialised backbone of
the same architecture, so the trained score is read against what training started from; a
run that started from ``model.pretrained`` also scores those weights (``{metric}_pretrained``),
so continued pretraining is read against its own starting point.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

import torch

from rayssl.engine.monitor import log
from rayssl.eval.features import scenes_eval_sets
from rayssl.methods import get_method
from rayssl.modules.backbone import build_backbone
from rayssl.modules.pretrained import load_into, read_weights
from rayssl.modules.seeding import cpu_seeded

__all__ = ["EpochEvaluator", "evaluated_epoch", "node_threads"]


def evaluated_epoch(cfg, epoch: int) -> bool:
    """Whether a run evaluates after (0-based) ``epoch``: the last, and every ``eval.every_epochs``
    (0: the last only)."""
    every = cfg.eval.every_epochs
    return epoch + 1 == cfg.run.epochs or bool(every and (epoch + 1) % every == 0)


@contextlib.contextmanager
def node_threads(device: torch.device) -> Iterator[None]:
    """On CPU, torch uses every core of the node for the duration (then its own count again).

    A CPU worker computes with the threads its Ray CPUs allow (one, for a fraction of a CPU);
    while rank 0 evaluates, the other ranks wait for it and Ray Data only starts the next epoch
    (its first batches, ``TrainFeed.start``), so the node's cores are nearly idle (the default run's evaluation took 31 s on one of two cores).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(before, cores))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class EpochEvaluator:
    """Scores ``engine``'s method after the epochs ``eval.every_epochs`` names and after the last."""

    def __init__(self, engine):
        self.engine = engine
        self.metric = get_method(engine.cfg.run.method).metric
        self.sets = None
        self.random_init = None
        self.pretrained = None

    def due(self, epoch: int) -> bool:
        """Whether (0-based) ``epoch`` ends with an evaluation on the scenes."""
        return self.engine.cfg.eval.num_test_images > 0 and evaluated_epoch(self.engine.cfg, epoch)

    def __call__(self, epoch: int) -> dict:
        """``{metric: score}`` (+ ``{metric}_random_init``), logged."""
        with node_threads(self.engine.device):
            return self._evaluate(epoch)

    def _evaluate(self, epoch: int) -> dict:
        cfg, method, device = self.engine.cfg, self.engine.method, self.engine.device
        t0 = time.perf_counter()
        if self.sets is None:
            self.sets = scenes_eval_sets(cfg.run.seed, cfg.data.scenes_image_size, cfg.eval.num_train_images,
                                         cfg.eval.num_test_images)
        size = cfg.data.crop_sizes[0]
        out = {self.metric: method.evaluate(self.metric, self.sets, size, device, cfg.eval)}
        if cfg.eval.random_baseline and method.random_init_baseline and self.random_init is None:
            self.random_init = self._random_init_score(size)
        if self.random_init is not None:
            out[f"{self.metric}_random_init"] = self.random_init
        if cfg.eval.random_baseline and method.random_init_baseline and cfg.model.pretrained:
            if self.pretrained is None:
                self.pretrained = self._start_score(size, pretrained=True)
            out[f"{self.metric}_pretrained"] = self.pretrained
        log(f"epoch {epoch + 1}: {self.metric} on held-out scenes {out[self.metric]:.4f}"
            + (f" (random init: {self.random_init:.4f})" if self.random_init is not None else "")
            + (f" (its starting weights: {self.pretrained:.4f})" if self.pretrained is not None else "")
            + f" [{time.perf_counter() - t0:.1f}s]")
        return out

    def _random_init_score(self, size: int) -> float:
        return self._start_score(size, pretrained=False)

    def start_backbone(self, pretrained: bool = False) -> torch.nn.Module:
        """A randomly initialised backbone of the run's architecture (seeded by ``run.seed``), or
        (``pretrained``) the weights ``model.pretrained`` names, on the engine's device."""
        cfg = self.engine.cfg
        with cpu_seeded(cfg.run.seed):  # leave the training's random streams untouched
            net, _ = build_backbone(cfg.model.backbone, small_stem=cfg.model.small_stem)
        if pretrained:
            state, _ = read_weights(cfg.model.pretrained, cfg.model.backbone, cfg.data.s3.signed())
            load_into(net, state, cfg.model.backbone, cfg.model.pretrained)
        return net.to(self.engine.device)

    def _start_score(self, size: int, pretrained: bool) -> float:
        """The metric for a randomly initialised backbone of the same architecture, or (``pretrained``)
        for the weights ``model.pretrained`` names."""
        from rayssl.eval.features import evaluate_on_scenes

        cfg = self.engine.cfg
        net = self.start_backbone(pretrained)
        return evaluate_on_scenes(self.metric, net, self.sets, size, self.engine.device, cfg.eval.knn_k,
                                  cfg.eval.knn_temperature)
