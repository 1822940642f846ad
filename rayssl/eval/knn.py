"""Weighted cosine k-nearest-neighbour classifier on frozen features (pure torch).

The protocol of Wu et al. 2018 (InstDisc, arXiv:1805.01978), as used by DINO
(Caron et al. 2021, arXiv:2104.14294): features are L2-normalised, each test sample
takes its k most cosine-similar training samples, and each neighbour votes for its
label with weight exp(similarity / temperature). The class with the largest summed
vote wins (ties go to the lowest class index).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_top1", "knn_predict"]


def _check(feats: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if feats.dim() != 2:
        raise ValueError(f"{name}_feats must be (N, d), got {tuple(feats.shape)}")
    if labels.shape != (feats.shape[0],):
        raise ValueError(f"{name}_labels must be ({feats.shape[0]},), got {tuple(labels.shape)}")


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Predicted class of each test sample.

    Args:
        train_feats: (N_train, d) float.
        train_labels: (N_train,) int64 in [0, num_classes).
        test_feats: (N_test, d) float.
        k: neighbours per test sample; capped at N_train.
        temperature: vote weight is exp(cosine / temperature).
        num_classes: defaults to max(train_labels) + 1.
        chunk_size: test rows scored at once; memory is O(chunk_size * N_train).
    Returns:
        (N_test,) int64 predictions, on the device of ``train_feats``.
    """
    train_feats = torch.as_tensor(train_feats)
    train_labels = torch.as_tensor(train_labels).long().to(train_feats.device)
    test_feats = torch.as_tensor(test_feats).to(train_feats.device)
    _check(train_feats, train_labels, "train")
    if test_feats.dim() != 2 or test_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(f"test_feats must be (N, {train_feats.shape[1]}), got {tuple(test_feats.shape)}")
    if train_feats.shape[0] == 0:
        raise ValueError("knn needs at least one training sample")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes})")
    k = min(k, train_feats.shape[0])

    # float32 at least: half-precision cosine similarities tie far too often.
    dtype = torch.promote_types(train_feats.dtype, torch.float32)
    bank = F.normalize(train_feats.to(dtype), dim=1)
    preds = []
    for start in range(0, test_feats.shape[0], chunk_size):
        q = F.normalize(test_feats[start:start + chunk_size].to(dtype), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=dtype, device=q.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=train_feats.device)
    return torch.cat(preds)


@torch.no_grad()
def knn_top1(train_feats, train_labels, test_feats, test_labels, k: int = 20,
             temperature: float = 0.07, num_classes: int | None = None,
             chunk_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1] of the weighted cosine kNN classifier.

    Args:
        train_feats: (N_train, d) float.
        train_labels: (N_train,) int64.
        test_feats: (N_test, d) float.
        test_labels: (N_test,) int64.
        k, temperature, chunk_size: see ``knn_predict``.
        num_classes: defaults to 1 + the largest label in train or test.
    """
    train_labels = torch.as_tensor(train_labels).long()
    test_labels = torch.as_tensor(test_labels).long()
    test_feats = torch.as_tensor(test_feats)
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError(f"test_labels must be ({test_feats.shape[0]},), got {tuple(test_labels.shape)}")
    if test_labels.numel() == 0:
        raise ValueError("knn_top1 needs at least one test sample")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                       num_classes=num_classes, chunk_size=chunk_size)
    return float((pred.cpu() == test_labels.cpu()).double().mean())
