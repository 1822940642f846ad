"""Frozen-backbone features and the held-out-scenes evaluation (pure PyTorch, no Ray)."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from rayssl.data.scenes import generate_batch, split_seed
from rayssl.data.tensors import to_float_images
from rayssl.eval.knn import knn_top1
from rayssl.eval.linear import linear_probe_map
from rayssl.modules.precision import resolve_precision


# Images per forward pass where the caller gives none. On a CPU, 256 images' activations (64 MB a
# tensor for ResNet-18's small stem at 32 px in fp32) are over glibc's largest mmap threshold: each
# is mapped and unmapped layer after layer, and page-faulted anew every batch. At 64 they stay in the
# heap: 1,000 held-out scenes took 5.4 s against 7.7 s at 256 (2-core AMD EPYC, 2026-12-07).
CPU_FEATURE_BATCH, FEATURE_BATCH = 64, 256


def feature_batch(device) -> int:
    """Images per forward pass of feature extraction on ``device`` (a CPU: ``CPU_FEATURE_BATCH``)."""
    return CPU_FEATURE_BATCH if torch.device(device).type == "cpu" else FEATURE_BATCH


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images: np.ndarray, size: int, device,
                     batch_size: int | None = None, on_device: bool = False, precision: str = "auto") -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> backbone features (N, d) float32 on CPU (``on_device``: where
    they were computed), in eval mode: no batch-norm statistic moves, the mode is restored.
    ``batch_size``: images per forward pass (default: 64 on a CPU, 256 on an accelerator; see
    ``CPU_FEATURE_BATCH``); a feature does not depend on it beyond float rounding.
    ``precision``: of the forward pass: bf16 autocast where it resolves to bf16 (``auto``: a GPU with
    bf16, a CPU with AMX; ``rayssl.modules.precision.resolve_precision``), else fp32 (fp16 is a
    training choice for old GPUs, not used for features); ``fp32`` for full-precision features.
    The images go in channels_last on every device (the weights keep their layout): oneDNN's CPU
    convolutions are faster so too, not only cuDNN's."""
    was_training = backbone.training
    backbone.eval()
    batch_size = batch_size or feature_batch(device)
    bf16 = resolve_precision(precision, torch.device(device)) == "bf16"
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
    out = []
    # channels_last images, on a CPU in fp32 too: a pass of ResNet-18 (small stem, 32 px, 1,500 images)
    # took 5-12% less time and one of ResNet-50 (224 px) about 30% less than with NCHW images, the
    # same features to float rounding; converting the weights as well saved about 1% more (2-core AMD
    # EPYC, medians of 3, 2026-12-07; docs/performance.md).
    for i in range(0, len(images), batch_size):
        x = to_float_images(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device))
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with autocast:
            feats = backbone(x).float()
        out.append(feats if on_device else feats.cpu())
    backbone.train(was_training)
    return torch.cat(out)


def scenes_eval_sets(seed: int, image_size: int, n_train: int, n_test: int) -> tuple[dict, dict]:
    """Labelled scenes for evaluation, from streams disjoint from the training scenes."""
    train = generate_batch(range(n_train), seed=split_seed(seed, "eval-train"), size=image_size)
    test = generate_batch(range(n_test), seed=split_seed(seed, "eval-test"), size=image_size)
    return train, test


def evaluate_on_scenes(metric: str, backbone: torch.nn.Module, sets: tuple[dict, dict], size: int, device,
                       k: int = 20, temperature: float = 0.07) -> float:
    """The method's metric of frozen ``backbone`` features on held-out scenes.

    ``knn_top1``: cosine kNN top-1 of the dominant class (SwAV's report).
    ``linear_map``: macro mAP of a linear multi-label probe (BCE) on the classes present
    (the multi-label report of MLS/MoCo and CDUL).
    """
    train, test = sets
    ftr = extract_features(backbone, train["image"], size, device)
    fte = extract_features(backbone, test["image"], size, device)
    if metric == "knn_top1":
        return knn_top1(ftr, torch.from_numpy(train["label"]), fte, torch.from_numpy(test["label"]),
                        k=k, temperature=temperature)
    if metric == "linear_map":
        return linear_probe_map(ftr, torch.from_numpy(train["labels"]).float(),
                                fte, torch.from_numpy(test["labels"]).float())
    raise ValueError(f"unknown evaluation metric {metric!r}")
