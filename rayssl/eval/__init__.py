"""Evaluation of frozen features: kNN top-1, linear probes, multi-label mAP (pure torch)."""

from .knn import knn_predict, knn_top1
from .linear import linear_probe_map, linear_probe_top1
from .metrics import average_precision, mean_average_precision

__all__ = [
    "knn_predict",
    "knn_top1",
    "linear_probe_map",
    "linear_probe_top1",
    "average_precision",
    "mean_average_precision",
]
