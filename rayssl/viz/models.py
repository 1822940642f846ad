"""What the model pictures need from a checkpoint (pure PyTorch, no Ray).

``load_method`` rebuilds the whole method module (backbone + heads + prototypes / momentum
encoder) from a rayssl checkpoint; ``swav_assignments`` and ``mls_positives`` compute what
``rayssl.viz.figures`` draws, in eval mode (BatchNorm running statistics), without gradients;
``load_label_store`` reads a CDUL checkpoint's label store (the labels after gradient alignment).
"""

from __future__ import annotations

import numpy as np
import torch

from rayssl.checkpoint import CheckpointError, LoadedCheckpoint
from rayssl.config import Config
from rayssl.data.tensors import to_float_images
from rayssl.methods import get_method
from rayssl.methods.mls import MLS
from rayssl.methods.swav import SwAV


def load_method(ckpt: LoadedCheckpoint) -> torch.nn.Module:
    """The checkpoint's method module (e.g. ``SwAV``, ``MLS``), weights loaded strictly, eval mode."""
    cfg = Config.from_dict(ckpt.config)
    spec = get_method(ckpt.method)
    model = spec.model_cls(cfg.method, cfg.model, num_crops=sum(cfg.data.crop_counts), world_size=1)
    model.load_state_dict(ckpt.model_state, strict=True)
    return model.eval()


def _batches(images: np.ndarray, batch_size: int = 128):
    for i in range(0, len(images), batch_size):
        yield to_float_images(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])), channels_last=False)


@torch.no_grad()
def swav_assignments(model, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N,) index of each image's best-scoring prototype.

    The score is the cosine between the image's L2-normalised projection and each prototype
    (the quantity SwAV's codes and predictions are computed from).
    """
    if not isinstance(model, SwAV):
        raise ValueError("prototype usage is a SwAV picture; this checkpoint has no prototypes")
    out = []
    for x in _batches(images):
        out.append(model.prototypes(model.embed([x])).argmax(dim=1))
    return torch.cat(out).numpy()


@torch.no_grad()
def mls_positives(model, queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """MLS's pseudo-labels made visible: top-k of g1 . Q_g.

    ``g1`` is the online backbone feature of each query image; ``Q_g`` holds the momentum
    backbone features of the gallery images, exactly what MLS enqueues (L2-normalised), so
    the gallery plays the queue. Returns ((Q, k) gallery indices, (Q, k) cosine similarities),
    most similar first.
    """
    if not isinstance(model, MLS):
        raise ValueError("queue positives are an MLS/MoCo picture; this checkpoint has no momentum encoder")
    if not 1 <= k <= len(gallery):
        raise ValueError(f"--k: must be in [1, {len(gallery)}] (the gallery size), got {k}")
    g1 = torch.cat([model.queries(x)[0] for x in _batches(queries)])
    qg = torch.cat([model.keys(x)[0] for x in _batches(gallery)])
    sims, idx = (g1 @ qg.T).topk(k, dim=1)
    return idx.numpy(), sims.numpy()


def load_label_store(ckpt: LoadedCheckpoint) -> dict:
    """CDUL: the label store saved with checkpoint ``ckpt`` (``latent`` (N, C), ``known`` (N,),
    ``updates``); CheckpointError (one line) when the checkpoint holds no label store."""
    store = ckpt.method_state.get("label_store")
    if not isinstance(store, dict) or not {"latent", "known"} <= set(store):
        raise CheckpointError(f"--checkpoint {ckpt.uri}: holds no CDUL label store (method_state.label_store)")
    latent = store["latent"]
    if latent.ndim != 2 or store["known"].shape != (latent.shape[0],):
        raise CheckpointError(f"--checkpoint {ckpt.uri}: malformed label store "
                              f"(latent {tuple(latent.shape)}, known {tuple(store['known'].shape)})")
    return {"latent": latent, "known": store["known"].bool(), "updates": int(store.get("updates", 0))}
