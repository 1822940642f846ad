"""Does the method learn? A time-boxed run on the built-in scenes, scored against its own random init.

``quality_run`` trains the default recipe (``python -m rayssl.train``'s config, or any config)
for as many whole epochs as ``seconds`` allow, on one device, without Ray: the engine's step
(``Engine.train_step``, the Ray worker's) fed by a ``torch.utils.data.DataLoader`` that
multi-crops the scenes with the functions the Ray Data tasks use (``multicrop_batch``, crops
seeded per (seed, epoch, scene), every epoch in a new global order: ``epoch_order``). The
scenes are generated once. The end is the run's own evaluation (``EpochEvaluator``: the kNN
top-1 of the trained backbone and of the random init it started from, on held-out scenes).

The CPU budget of the default run (128 steps) leaves the trained backbone within noise of its
random init; this is the same question asked with a GPU's budget.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rayssl.config import Config
from rayssl.data.multicrop import crop_spec, multicrop_batch, sample_generators
from rayssl.data.scenes import epoch_order, generate_batch, split_seed
from rayssl.data.tensors import to_float_images
from rayssl.engine import Engine, EpochEvaluator
from rayssl.eval.probes import probe_scenes

__all__ = ["SceneCrops", "cut_batches", "epoch_batches", "quality_run"]


def cut_batches(chunks: Iterable[dict], batch_size: int, keys: Sequence[str]) -> Iterator[list[torch.Tensor]]:
    """Exact batches of ``batch_size`` rows cut from chunks (dicts of arrays, rows first), in
    order; the rows left over at the end are dropped (as ``drop_last``)."""
    pending: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    count = 0
    for chunk in chunks:
        for k in keys:
            pending[k].append(torch.as_tensor(chunk[k]))
        count += len(chunk[keys[0]])
        while count >= batch_size:
            whole = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in pending.items()}
            yield [whole[k][:batch_size] for k in keys]
            pending = {k: [whole[k][batch_size:]] for k in keys}
            count -= batch_size


class SceneCrops(IterableDataset):
    """Crop chunks of the scenes, epoch after epoch from ``first_epoch``: dicts of ``crop_j``
    uint8 arrays with the chunk's ``epoch`` and ``rows``. ``images``: the scenes generated once
    (N, H, W, 3), or None to generate each chunk's scenes where it is cropped, as the Ray Data
    tasks do (``scenes``: (count, seed, size) then). Each epoch visits the scenes in
    ``epoch_order``, chunk ``i`` going to DataLoader worker ``i % workers``; every worker
    yields the same number of chunks per epoch (an empty one, ``rows`` 0, where it has none
    left), so the DataLoader's round robin over its workers returns the epochs in order."""

    def __init__(self, images: np.ndarray | None, spec, seed: int, chunk: int, first_epoch: int = 0,
                 scenes: tuple[int, int, int] | None = None):
        self.images, self.spec, self.seed, self.chunk, self.first_epoch = images, spec, seed, chunk, first_epoch
        self.scenes = scenes
        self.count = len(images) if images is not None else scenes[0]

    def _images(self, ids: np.ndarray) -> list[np.ndarray]:
        if self.images is not None:
            return list(self.images[ids])
        _, seed, size = self.scenes
        return list(generate_batch(ids, seed=seed, size=size)["image"])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        starts = range(0, self.count, self.chunk)
        per_worker = -(-len(starts) // workers)
        epoch = self.first_epoch
        while True:
            order = epoch_order(self.count, self.seed, epoch)
            mine = starts[worker::workers]
            for i in range(per_worker):
                if i >= len(mine):
                    yield {"epoch": epoch, "rows": 0}
                    continue
                ids = order[mine[i]:mine[i] + self.chunk]
                crops = multicrop_batch(self._images(ids), self.spec, sample_generators(self.seed, epoch, ids.tolist()))
                yield {"epoch": epoch, "rows": len(ids), **crops}
            epoch += 1


def epoch_batches(chunks: Iterable[dict], batch_size: int, keys: Sequence[str]) -> Iterator[tuple[int, list]]:
    """``(epoch, batch)`` from ``SceneCrops`` chunks: exact batches within each epoch, the
    remainder of an epoch dropped."""
    for epoch, group in itertools.groupby((c for c in chunks if c["rows"]), key=lambda c: int(c["epoch"])):
        for batch in cut_batches(group, batch_size, keys):
            yield epoch, batch


def quality_run(cfg: Config, device: torch.device, seconds: float | None, workers: int | None = None,
                calibration_steps: int = 8, pregenerate: bool = True,
                probe_sizes: tuple[int, int] | None = None) -> dict:
    """Train ``cfg`` (SwAV on the scenes) for the whole epochs that fit in ``seconds`` (None:
    ``cfg.run.epochs``, no calibration); its kNN against its random init. ``workers``: DataLoader
    processes (default cores - 1, at most 8). ``pregenerate``: generate the scenes once (else in
    the loader's workers, every epoch, as the Ray Data tasks of a run do). ``probe_sizes``:
    (train, test) held-out scenes on which the feature probes (``rayssl.eval.probes``) score the
    trained backbone and its random init on seven attributes; None: no probes."""
    workers = workers if workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    d = cfg.data
    t0 = time.perf_counter()
    seed = split_seed(cfg.run.seed, "train")
    images = None
    if pregenerate:
        images = generate_batch(range(d.scenes_num_images), seed=seed, size=d.scenes_image_size)["image"]
    generate_s = time.perf_counter() - t0
    keys = [f"crop_{j}" for j in range(sum(d.crop_counts))]
    steps_per_epoch = d.scenes_num_images // cfg.run.batch_size

    def batches(engine: Engine) -> Iterator[tuple[int, list[torch.Tensor]]]:
        crops = SceneCrops(images, crop_spec(d), seed, chunk=cfg.run.batch_size,
                           scenes=(d.scenes_num_images, seed, d.scenes_image_size))
        loader = DataLoader(crops, batch_size=None,
                            num_workers=workers, pin_memory=device.type == "cuda",
                            prefetch_factor=4 if workers else None,
                            multiprocessing_context="spawn" if workers else None)  # this process may hold Ray
        for epoch, crops in epoch_batches(loader, cfg.run.batch_size, keys):
            yield epoch, [to_float_images(c.to(device, non_blocking=True), channels_last=engine.channels_last)
                          for c in crops]

    step_s, epochs = None, cfg.run.epochs
    if seconds is not None:  # calibrate: seconds per step (data included) of a throwaway engine
        step_s = _calibrate(cfg, steps_per_epoch, device, batches, calibration_steps)
        epochs = max(1, int(seconds / max(1e-6, step_s * steps_per_epoch)))

    raw = cfg.to_dict()
    cfg = Config.from_dict({**raw, "run": {**raw["run"], "epochs": epochs}})
    engine = Engine(cfg, steps_per_epoch, device)
    engine.start()
    t_train = time.perf_counter()
    end_losses: list[float] = []
    it = batches(engine)
    for epoch, crops in it:
        if epoch >= epochs:
            break
        engine.epoch = epoch
        metrics = engine.train_step(crops, {})
        if engine.step % steps_per_epoch == 0:
            end_losses.append(float(metrics["loss"]))
    it.close()
    _sync(device)
    train_s = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    evaluate = EpochEvaluator(engine)
    scores = evaluate(epochs - 1)
    metric, base = evaluate.metric, scores.get(f"{evaluate.metric}_random_init")
    probes = None
    if probe_sizes is not None:
        probes = probe_scenes({"trained": engine.method.backbone, "random init": evaluate.start_backbone()},
                              d.scenes_image_size, cfg.run.seed, *probe_sizes, k=cfg.eval.knn_k, device=device,
                              temperature=cfg.eval.knn_temperature)
    return {
        "method": cfg.run.method, "backbone": cfg.model.backbone, "small_stem": cfg.model.small_stem,
        "batch_size": cfg.run.batch_size, "crops": [f"{c}x{s}" for s, c in zip(d.crop_sizes, d.crop_counts)],
        "scenes": d.scenes_num_images, "pregenerated": pregenerate, "budget_s": seconds, "calibrated_step_s": step_s and round(step_s, 4),
        "epochs": epochs,
        "steps": engine.step, "images_seen": engine.images_seen, "loader_workers": workers,
        "generate_s": round(generate_s, 1), "train_s": round(train_s, 1),
        "images_per_s": round(engine.images_seen / train_s, 1), "eval_s": round(time.perf_counter() - t_eval, 1),
        "loss_first_epoch_end": end_losses[0], "final_loss": end_losses[-1], "metric": metric, metric: scores[metric],
        f"{metric}_random_init": base, "gain_over_random_init": None if base is None else scores[metric] - base,
        **({"probes": probes} if probes is not None else {}),
    }


def _calibrate(cfg: Config, steps_per_epoch: int, device: torch.device, batches, steps: int) -> float:
    """Seconds per step, data included, of a throwaway engine after its first two steps."""
    probe = Engine(cfg, steps_per_epoch, device)
    probe.start()
    it = batches(probe)
    for _ in range(min(2, steps_per_epoch)):
        probe.train_step(next(it)[1], {})
    timed = max(1, min(steps, steps_per_epoch))
    _sync(device)
    t = time.perf_counter()
    for _ in range(timed):
        probe.train_step(next(it)[1], {})
    _sync(device)
    it.close()
    return (time.perf_counter() - t) / timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
