"""What a training run evaluates at the end of its epochs, and on what.

* ``eval.data`` given: the user's labelled images, scored as ``rayssl eval`` scores a checkpoint
  (``rayssl.eval.evaluate.evaluate``: the same reading, resizing, split, kNN or linear probe) on
  the run's weights after the epoch, the features extracted by the eval job's own read functions
  and inference code (``score_weights``): in a Ray task beside training (``BackgroundEvaluation``,
  ``eval.where``: ``beside``, or ``auto`` when training on GPUs), or on rank 0 between epochs
  (``UserDataEvaluation``: on CPUs, which training keeps busy, and in Tune trials, whose
  schedulers compare trials at an epoch by that epoch's score);
* else, training on the built-in scenes: held-out scenes (``rayssl.engine.EpochEvaluator``), on
  rank 0 between epochs;
* else nothing, said once (``no_evaluation_note``): a score on generated scenes says nothing
  about a model of the user's images.

At the epochs ``eval.every_epochs`` names and the last. On rank 0, with every core of the node
on a CPU (``node_threads``), training waiting for it.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from rayssl.checkpoint import BACKBONE_PREFIX, LoadedCheckpoint
from rayssl.config import Config
from rayssl.engine import EpochEvaluator, log
from rayssl.engine.evaluate import evaluated_epoch, node_threads
from rayssl.engine.probe import LabelledImages, OnlineProbe
from rayssl.data.scenes import SHAPES
from rayssl.eval.evaluate import LabelledSource, evaluate, labelled_split, open_run_sources, run_request
from rayssl.eval.features import scenes_eval_sets
from rayssl.eval.job import ActorPool, BackboneFeatures, FeatureTable, collect, listed_images, read_source
from rayssl.methods import get_method

__all__ = ["BackgroundEvaluation", "UserDataEvaluation", "evaluator_for", "no_evaluation_note", "online_probe",
           "score_weights"]


def no_evaluation_note(cfg: Config) -> str | None:
    """The one line a run without an evaluation says, else None."""
    if cfg.eval.data or cfg.data.builtin_scenes or cfg.eval.num_test_images < 1:
        return None
    return (f"no evaluation during this run: it trains on {cfg.data.source}, and scores on the built-in scenes "
            "would say nothing about it; add --eval-data (labelled images of yours: an ImageFolder, or images "
            "with --eval-labels) to score the backbone every eval.every_epochs and at the end")


class _NoEvaluation:
    def at_epoch_end(self, epoch: int) -> dict:
        return {}


class _Inline:
    """An evaluation run on rank 0 at the epochs it is due, training waiting for it."""

    def __init__(self, evaluate):
        self.evaluate = evaluate

    def at_epoch_end(self, epoch: int) -> dict:
        return self.evaluate(epoch) if self.evaluate.due(epoch) else {}


def score_weights(cfg: Config, epoch: int, backbone: dict, *, baseline: bool, device: str, threads: int,
                  sources=None) -> tuple[dict, dict]:
    """``eval.data``'s score of the backbone weights after (0-based) ``epoch``, as ``rayssl eval``
    scores a checkpoint (``rayssl.eval.evaluate.evaluate``), the features extracted in this process
    by the eval job's read functions (``read_source``) and its inference actor's code
    (``BackboneFeatures``) on ``device`` with ``threads``. Rank 0 calls it between epochs, the
    background task beside training. Returns (the report's keys, ``evaluate``'s result)."""
    req = run_request(cfg.eval, cfg.run.seed, cfg.data.parquet_image_column)
    req.baseline = baseline
    if sources is None:
        sources = open_run_sources(cfg.eval, cfg.run.seed, cfg.data.s3, cfg.data.parquet_image_column)
    ckpt = LoadedCheckpoint(uri=f"{cfg.run.output} (epoch {epoch + 1}, live weights)", state={
        "method": cfg.run.method, "config": cfg.to_dict(), "epoch": epoch + 1, "model": backbone})

    def features(ls: LabelledSource, state: dict, size: int) -> FeatureTable:
        encode = BackboneFeatures(cfg.model.backbone, cfg.model.small_stem, state, size, threads=threads, device=device)
        batches = read_source(ls.source, ls.ids_by_path, size=size, parquet_id_column=ls.parquet_id_column)
        return collect((encode(b) for b in batches if len(b["id"])), listed_images(ls.source, ls.ids_by_path))

    result = evaluate(req, ckpt, sources, ActorPool(), extract=features)
    metric = result["metric"]
    out = {metric: result[metric], "eval_data": cfg.eval.data, "eval_images": result["num_train"] + result["num_test"],
           "eval_skipped_images": result["skipped_images"]}
    if f"{metric}_random_init" in result:
        out[f"{metric}_random_init"] = result[f"{metric}_random_init"]
    return out, result


def _live_backbone(engine, copy: bool = False) -> dict:
    """The backbone's weights now, on the CPU (what ``evaluate`` reads of a checkpoint); ``copy``:
    tensors of their own even on a CPU device, for a task that reads them while training goes on."""
    return {k: v.detach().to("cpu", copy=copy) for k, v in engine.method.state_dict().items()
            if k.startswith(BACKBONE_PREFIX)}


class UserDataEvaluation:
    """The run's backbone scored on ``eval.data`` (see the module docstring): on rank 0 between
    epochs, training waiting for it (``eval.where=rank0``, ``auto`` on CPUs, and every Tune trial)."""

    def __init__(self, engine):
        self.engine = engine
        self.sources = None
        self.random_init: float | None = None

    def due(self, epoch: int) -> bool:
        return evaluated_epoch(self.engine.cfg, epoch)

    def __call__(self, epoch: int) -> dict:
        cfg, t0 = self.engine.cfg, time.perf_counter()
        with node_threads(self.engine.device):
            if self.sources is None:  # listed and checked once (the command checked them before Ray)
                self.sources = open_run_sources(cfg.eval, cfg.run.seed, cfg.data.s3, cfg.data.parquet_image_column)
            out, result = score_weights(cfg, epoch, _live_backbone(self.engine),
                                        baseline=cfg.eval.random_baseline and self.random_init is None,
                                        device=str(self.engine.device), threads=torch.get_num_threads(),
                                        sources=self.sources)
        self.random_init = with_random_init(out, result["metric"], self.random_init)
        log(score_text(cfg, epoch, out, result, time.perf_counter() - t0))
        return out


def with_random_init(out: dict, metric: str, known: float | None) -> float | None:
    """Adds the random init's score (scored once per run) to ``out``; returns it."""
    known = out.get(f"{metric}_random_init", known)
    if known is not None:
        out[f"{metric}_random_init"] = known
    return known


def score_text(cfg: Config, epoch: int, out: dict, result: dict, seconds: float, where: str = "") -> str:
    metric = result["metric"]
    base = out.get(f"{metric}_random_init")
    return (f"epoch {epoch + 1}: {metric} on {cfg.eval.data} {out[metric]:.4f} ({result['num_train']} train / "
            f"{result['num_test']} test images" + (f", {result['skipped_images']} unreadable skipped"
                                                    if result["skipped_images"] else "")
            + (f"; random init: {base:.4f}" if base is not None else "") + f") [{where}{seconds:.1f}s]")


@ray.remote(max_retries=0)
def _score_beside_training(config: dict, epoch: int, backbone: dict, baseline: bool, threads: int) -> tuple:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out, result = score_weights(Config.from_dict(config), epoch, backbone, baseline=baseline, device="cpu",
                                threads=threads)
    return out, {k: result[k] for k in ("metric", "num_train", "num_test", "skipped_images")}, time.perf_counter() - t0


class BackgroundEvaluation:
    """``eval.data``'s evaluation as a Ray task beside training (``eval.where=beside``, or ``auto``
    on GPUs): at an evaluated epoch rank 0 hands the task a CPU copy of the backbone's weights and
    trains on; at later epoch ends it collects a finished score, reported under
    ``late_evaluations`` against the epoch it belongs to (the trackers put it there). At most one
    runs: when the next is due first, rank 0 waits for it. The run's last epoch, with nothing left
    to train beside it, is scored on rank 0 (``UserDataEvaluation``). The task reserves
    ``eval.background_cpus`` (0: none, so it never holds a CPU Ray Data needs) and computes with
    that many threads (at least one) on the CPU."""

    def __init__(self, engine):
        self.engine = engine
        self.here = UserDataEvaluation(engine)  # the last epoch's
        self.running: tuple[int, ray.ObjectRef] | None = None
        self.baseline_asked = False

    def at_epoch_end(self, epoch: int) -> dict:
        cfg, due = self.engine.cfg, evaluated_epoch(self.engine.cfg, epoch)
        report: dict = {}
        if self.running is not None and (due or ray.wait([self.running[1]], timeout=0)[0]):
            e, ref = self.running
            self.running = None
            out, result, seconds = ray.get(ref)  # a failed evaluation fails the run, as on rank 0
            self.here.random_init = with_random_init(out, result["metric"], self.here.random_init)
            log(score_text(cfg, e, out, result, seconds, "beside training, "))
            report["late_evaluations"] = [{"epoch": e + 1, **out, "reported_epoch": epoch + 1}]
        if due and epoch + 1 == cfg.run.epochs:
            report.update(self.here(epoch))
        elif due:
            baseline = cfg.eval.random_baseline and not self.baseline_asked
            self.baseline_asked = True
            cpus = cfg.eval.background_cpus
            self.running = (epoch, _score_beside_training.options(num_cpus=cpus).remote(
                cfg.to_dict(), epoch, _live_backbone(self.engine, copy=True), baseline, max(1, round(cpus))))
            log(f"epoch {epoch + 1}: evaluating on {cfg.eval.data} in a Ray task beside training")
        return report


def evaluator_for(engine):
    """The run's evaluation (see the module docstring): ``at_epoch_end(epoch)`` -> the metrics."""
    cfg = engine.cfg
    if cfg.eval.data:
        beside = cfg.eval.where == "beside" or (cfg.eval.where == "auto" and engine.device.type == "cuda")
        return BackgroundEvaluation(engine) if beside else _Inline(UserDataEvaluation(engine))
    if cfg.data.builtin_scenes:
        return _Inline(EpochEvaluator(engine))
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
    ids, images, sets = _read_labelled(sources.train, size)
    test = _read_labelled(sources.test, size)[1:] if sources.test is not None else None
    x_tr, y_tr, x_te, y_te, classes = labelled_split(cfg.eval.protocol, ids, images, sets, test,
                                                     test_fraction=cfg.eval.test_fraction, seed=cfg.run.seed,
                                                     flags=("--eval-labels", "--eval-labels"))
    return LabelledImages(x_tr, y_tr, len(classes)), LabelledImages(x_te, y_te, len(classes))


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
    probe = OnlineProbe(engine.method.backbone, train, test, size, engine.device,
                        batch_size=cfg.eval.online_probe_batch, lr=cfg.eval.online_probe_lr, seed=cfg.run.seed)
    log(f"online probe: a linear head on {len(train.targets)} labelled images, scored on {len(test.targets)} "
        f"every epoch ({probe.metric}) [{time.perf_counter() - t0:.1f}s]")
    return probe
