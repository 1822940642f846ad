"""What a training run evaluates at the end of its epochs, and on what.

* ``eval.data`` given: the user's labelled images, scored as ``rayssl eval`` scores a checkpoint
  (``rayssl.eval.evaluate.evaluate``: the same reading, resizing, split, kNN or linear probe) on
  the run's live weights, the features extracted on rank 0's device by the eval job's own read
  functions and inference code, in-process (``UserDataEvaluation``);
* else, training on the built-in scenes: held-out scenes (``rayssl.engine.EpochEvaluator``);
* else nothing, said once (``no_evaluation_note``): a score on generated scenes says nothing
  about a model of the user's images.

Blocking, on rank 0, at the epochs ``eval.every_epochs`` names and the last, as the scenes'
evaluation is; with every core of the node on a CPU (``node_threads``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from rayssl.checkpoint import BACKBONE_PREFIX, LoadedCheckpoint
from rayssl.config import Config
from rayssl.engine import EpochEvaluator, log
from rayssl.engine.evaluate import evaluated_epoch, node_threads
from rayssl.engine.probe import LabelledImages, OnlineProbe
from rayssl.data.scenes import SHAPES
from rayssl.eval.evaluate import LabelledSource, class_targets, evaluate, open_run_sources, run_request
from rayssl.eval.features import scenes_eval_sets
from rayssl.eval.job import ActorPool, BackboneFeatures, FeatureTable, collect, listed_images, read_source
from rayssl.eval.preprocess import split_train_test
from rayssl.methods import get_method

__all__ = ["UserDataEvaluation", "evaluator_for", "no_evaluation_note", "online_probe"]

def no_evaluation_note(cfg: Config) -> str | None:
    """The one line a run without an evaluation says, else None."""
    if cfg.eval.data or cfg.data.builtin_scenes or cfg.eval.num_test_images < 1:
        return None
    return (f"no evaluation during this run: it trains on {cfg.data.source}, and scores on the built-in scenes "
            "would say nothing about it; add --eval-data (labelled images of yours: an ImageFolder, or images "
            "with --eval-labels) to score the backbone every eval.every_epochs and at the end")


class _NoEvaluation:
    def due(self, epoch: int) -> bool:
        return False


class UserDataEvaluation:
    """The run's backbone scored on ``eval.data`` (see the module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        cfg = engine.cfg
        self.req = run_request(cfg.eval, cfg.run.seed, cfg.data.parquet_image_column)
        self.sources = None
        self.random_init: float | None = None

    def due(self, epoch: int) -> bool:
        return evaluated_epoch(self.engine.cfg, epoch)

    def __call__(self, epoch: int) -> dict:
        cfg, t0 = self.engine.cfg, time.perf_counter()
        with node_threads(self.engine.device):
            if self.sources is None:  # listed and checked once (the command checked them before Ray)
                self.sources = open_run_sources(cfg.eval, cfg.run.seed, cfg.data.s3, cfg.data.parquet_image_column)
            self.req.baseline = cfg.eval.random_baseline and self.random_init is None
            ckpt = LoadedCheckpoint(uri=f"{cfg.run.output} (epoch {epoch + 1}, live weights)", state={
                "method": cfg.run.method, "config": cfg.to_dict(), "epoch": epoch + 1,
                "model": {k: v.detach().cpu() for k, v in self.engine.method.state_dict().items()
                          if k.startswith(BACKBONE_PREFIX)}})  # what evaluate reads of it
            result = evaluate(self.req, ckpt, self.sources, ActorPool(), extract=self._features)
        metric = result["metric"]
        if f"{metric}_random_init" in result:
            self.random_init = result[f"{metric}_random_init"]
        out = {metric: result[metric], "eval_data": cfg.eval.data, "eval_images": result["num_train"] + result["num_test"],
               "eval_skipped_images": result["skipped_images"]}
        if self.random_init is not None:
            out[f"{metric}_random_init"] = self.random_init
        log(f"epoch {epoch + 1}: {metric} on {cfg.eval.data} {out[metric]:.4f} ({result['num_train']} train / "
            f"{result['num_test']} test images" + (f", {result['skipped_images']} unreadable skipped"
                                                    if result["skipped_images"] else "")
            + (f"; random init: {self.random_init:.4f}" if self.random_init is not None else "")
            + f") [{time.perf_counter() - t0:.1f}s]")
        return out

    def _features(self, ls: LabelledSource, state: dict, size: int) -> FeatureTable:
        """What ``rayssl.eval.job.source_features`` returns for ``ls``, computed here: the eval
        job's read functions (``read_source``) and its inference actor's code (``BackboneFeatures``)
        in this process, on this worker's device and threads."""
        cfg = self.engine.cfg
        encode = BackboneFeatures(cfg.model.backbone, cfg.model.small_stem, state, size,
                                  threads=torch.get_num_threads(), device=str(self.engine.device))
        batches = read_source(ls.source, ls.ids_by_path, size=size, parquet_id_column=ls.parquet_id_column)
        return collect((encode(b) for b in batches if len(b["id"])), listed_images(ls.source, ls.ids_by_path))


def evaluator_for(engine):
    """The run's evaluation (see the module docstring): ``due(epoch)``, then a call for the metrics."""
    cfg = engine.cfg
    if cfg.eval.data:
        return UserDataEvaluation(engine)
    if cfg.data.builtin_scenes:
        return EpochEvaluator(engine)
    return _NoEvaluation()


def _read_labelled(ls: LabelledSource, size: int) -> tuple[list[str], np.ndarray, list[tuple[str, ...]]]:
    """Every readable labelled image of ``ls`` (resized as the evaluation reads it), in memory."""
    ids, images = [], []
    for batch in read_source(ls.source, ls.ids_by_path, size=size, parquet_id_column=ls.parquet_id_column):
        for i, image in zip(batch["id"], batch["image"]):
            if str(i) in ls.labels:
                ids.append(str(i))
                images.append(np.asarray(image, dtype=np.uint8))
    if not ids:
        raise ValueError(f"eval.online_probe: no readable labelled image in {ls.uri}")
    return ids, np.stack(images), [ls.labels[i] for i in ids]


def _user_probe_sets(cfg: Config, size: int) -> tuple[LabelledImages, LabelledImages]:
    """``eval.data``'s train and test splits as ``rayssl eval`` splits them, images in memory."""
    sources = open_run_sources(cfg.eval, cfg.run.seed, cfg.data.s3, cfg.data.parquet_image_column)
    protocol = cfg.eval.protocol
    ids, images, sets = _read_labelled(sources.train, size)
    if sources.test is not None:
        _, images_te, sets_te = _read_labelled(sources.test, size)
        classes = sorted({c for labels in sets + sets_te for c in labels})
        y, y_te = (class_targets(protocol, s, classes, "--eval-labels") for s in (sets, sets_te))
        return LabelledImages(images, y, len(classes)), LabelledImages(images_te, y_te, len(classes))
    classes = sorted({c for labels in sets for c in labels})
    y = class_targets(protocol, sets, classes, "--eval-labels")
    tr, te = split_train_test(ids, cfg.eval.test_fraction, cfg.run.seed)
    return LabelledImages(images[tr], y[tr], len(classes)), LabelledImages(images[te], y[te], len(classes))


def _scene_probe_sets(cfg: Config) -> tuple[LabelledImages, LabelledImages]:
    """The held-out labelled scenes the run's evaluation uses: the dominant shape for a method
    scored by kNN top-1, every shape present (multi-hot) for one scored by mAP."""
    sets = scenes_eval_sets(cfg.run.seed, cfg.data.scenes_image_size, cfg.eval.num_train_images,
                            cfg.eval.num_test_images)
    key = "label" if get_method(cfg.run.method).metric == "knn_top1" else "labels"
    return tuple(LabelledImages(s["image"], s[key], len(SHAPES)) for s in sets)


def online_probe(engine) -> OnlineProbe | None:
    """Rank 0's online linear probe when ``eval.online_probe`` (see ``rayssl.engine.probe``)."""
    cfg = engine.cfg
    if not cfg.eval.online_probe:
        return None
    t0, size = time.perf_counter(), cfg.data.crop_sizes[0]
    train, test = _user_probe_sets(cfg, size) if cfg.eval.data else _scene_probe_sets(cfg)
    probe = OnlineProbe(engine.method.backbone, train, test, size, engine.device, batch_size=cfg.eval.online_probe_batch,
                        lr=cfg.eval.online_probe_lr, seed=cfg.run.seed)
    log(f"online probe: a linear head on {len(train.targets)} labelled images, scored on {len(test.targets)} "
        f"every epoch ({probe.metric}) [{time.perf_counter() - t0:.1f}s]")
    return probe
