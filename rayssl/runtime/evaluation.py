"""What a training run evaluates at the end of its epochs, and on what.

* ``eval.data`` given: the user's labelled images, scored as ``rayssl eval`` scores a checkpoint
  (``rayssl.eval.evaluate.evaluate``: the same reading, resizing, split, kNN or linear probe) on
  the run's live weights, the features extracted on rank 0's device by the read functions the
  eval job's Ray Data tasks run (``UserDataEvaluation``);
* else, training on the built-in scenes: held-out scenes (``rayssl.engine.EpochEvaluator``);
* else nothing, said once (``no_evaluation_note``): a score on generated scenes says nothing
  about a model of the user's images.

Blocking, on rank 0, at the epochs ``eval.every_epochs`` names and the last, as the scenes'
evaluation is; with every core of the node on a CPU (``node_threads``).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import torch

from rayssl.checkpoint import LoadedCheckpoint
from rayssl.config import Config
from rayssl.engine import EpochEvaluator, log
from rayssl.engine.evaluate import node_threads
from rayssl.eval.evaluate import LabelledSource, evaluate, open_run_sources, run_request
from rayssl.eval.features import extract_features
from rayssl.eval.job import ActorPool, FeatureTable, read_files, read_parquet_rows, read_tar_shards
from rayssl.modules.backbone import build_backbone

__all__ = ["UserDataEvaluation", "evaluator_for", "no_evaluation_note"]

CHUNK = 64  # images read and encoded at a time


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
        """The last epoch, and every ``eval.every_epochs`` (0: the last only)."""
        cfg = self.engine.cfg
        every = cfg.eval.every_epochs
        return epoch + 1 == cfg.run.epochs or bool(every and (epoch + 1) % every == 0)

    def __call__(self, epoch: int) -> dict:
        cfg, t0 = self.engine.cfg, time.perf_counter()
        with node_threads(self.engine.device):
            if self.sources is None:  # listed and checked once (the command checked them before Ray)
                self.sources = open_run_sources(cfg.eval, cfg.run.seed, cfg.data.s3, cfg.data.parquet_image_column)
            self.req.baseline = cfg.eval.random_baseline and self.random_init is None
            ckpt = LoadedCheckpoint(uri=f"{cfg.run.output} (epoch {epoch + 1}, live weights)", state={
                "method": cfg.run.method, "config": cfg.to_dict(), "epoch": epoch + 1,
                "model": {k: v.detach().cpu() for k, v in self.engine.method.state_dict().items()}})
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
        """Features of every readable image of ``ls`` (what ``rayssl.eval.job.source_features``
        returns), read and encoded here, a chunk at a time."""
        cfg, device = self.engine.cfg, self.engine.device
        net, _ = build_backbone(cfg.model.backbone, small_stem=cfg.model.small_stem)
        net.load_state_dict(state, strict=True)
        net.to(device)
        ids: list[str] = []
        feats: list[torch.Tensor] = []
        for batch in _read(ls, size):
            if len(batch["id"]):
                ids += [str(i) for i in batch["id"]]
                feats.append(extract_features(net, batch["image"], size, device))
        expected = len(ls.ids_by_path) if ls.ids_by_path is not None else None
        features = torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)
        return FeatureTable(ids, features, {}, max(0, expected - len(ids)) if expected is not None else 0)


def _read(ls: LabelledSource, size: int):
    """``{"id", "image"}`` batches of ``ls``'s images, decoded and resized as the eval job's tasks do."""
    src = ls.source
    if src.kind == "images":
        paths = list(ls.ids_by_path)
        for i in range(0, len(paths), CHUNK):
            chunk = paths[i:i + CHUNK]
            yield read_files({"id": [ls.ids_by_path[p] for p in chunk], "path": chunk}, fs=src.fs, size=size)
    elif src.kind == "webdataset":
        for path in src.paths:
            yield from read_tar_shards({"path": [path]}, fs=src.fs, size=size, chunk=CHUNK)
    else:  # parquet
        for path in src.paths:
            with src.fs.open(path, "rb") as f:
                for rows in pq.ParquetFile(f).iter_batches(batch_size=CHUNK,
                                                           columns=[ls.parquet_id_column, src.image_column]):
                    yield read_parquet_rows(rows.to_pydict(), id_column=ls.parquet_id_column,
                                            image_column=src.image_column, size=size)


def evaluator_for(engine):
    """The run's evaluation (see the module docstring): ``due(epoch)``, then a call for the metrics."""
    cfg = engine.cfg
    if cfg.eval.data:
        return UserDataEvaluation(engine)
    if cfg.data.builtin_scenes:
        return EpochEvaluator(engine)
    return _NoEvaluation()
