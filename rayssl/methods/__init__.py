"""Method registry: one entry per method feeds the CLI choices, config and tests.

Each method module defines a config dataclass (paper defaults, validated) and an
``nn.Module`` whose ``forward(crops, epoch=..., step=...)`` returns ``(loss, metrics)``.
Method modules are pure PyTorch and are imported lazily, so the CLI can validate a
config without paying for the import of every method.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: str  # "rayssl.methods.swav"
    config_name: str  # class name of the config dataclass in ``module``
    model_name: str  # class name of the nn.Module in ``module``
    metric: str  # the evaluation metric reported for this method (higher is better)
    summary: str

    @property
    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def model_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.model_name)


_REGISTRY: dict[str, MethodSpec] = {
    "swav": MethodSpec(
        name="swav",
        module="rayssl.methods.swav",
        config_name="SwAVConfig",
        model_name="SwAV",
        metric="knn_top1",
        summary="SwAV: online clustering with distributed Sinkhorn-Knopp and multi-crop (Caron et al. 2020)",
    ),
    "mls": MethodSpec(
        name="mls",
        module="rayssl.methods.mls",
        config_name="MLSConfig",
        model_name="MLS",
        metric="linear_map",
        summary="MLS: MoCo-v2 + top-k multi-label BCE against an aligned pair of queues (Zhu, Fu, Wu 2023)",
    ),
    "moco": MethodSpec(
        name="moco",
        module="rayssl.methods.mls",
        config_name="MoCoConfig",
        model_name="MLS",
        metric="linear_map",
        summary="MoCo-v2: momentum encoder + InfoNCE against a queue; MLS with lam = 0 (Chen et al. 2020)",
    ),
    "cdul": MethodSpec(
        name="cdul",
        module="rayssl.methods.cdul",
        config_name="CDULConfig",
        model_name="CDUL",
        metric="classifier_map",
        summary="CDUL: classifier on CLIP global-local pseudo-labels, refined by gradient alignment "
                "(Abdelfattah et al. 2023)",
    ),
}


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None
