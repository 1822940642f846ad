"""The configs the benchmark measures: rayssl's own presets, sized for one machine."""

from __future__ import annotations

from typing import Sequence

from rayssl.config import SECTIONS, Config, apply_assignments, build_section, deep_merge
from rayssl.methods import get_method
from rayssl.presets import resolve_preset

__all__ = ["BENCH_PRESETS", "bench_config", "bench_warmup", "fitted", "ingest_config"]

# Settings layered on rayssl.presets' "quick" (cpu) or "paper" (gpu) preset.
BENCH_PRESETS: dict[str, dict] = {
    "cpu": {"preset": "quick", "scene_size": 72, "batch_size": 32,
            "overrides": {"swav": {"queue_length": 0}}},
    # The papers' crops come with the paper preset (SwAV 2x224 + 6x96, MLS/MoCo and CDUL 2x224).
    "gpu": {"preset": "paper", "scene_size": 256, "batch_size": 256,
            "overrides": {"model": {"backbone": "resnet50"}}},
}


def fitted(raw: dict, method: str, batch_size: int, workers: int) -> dict:
    """``raw`` with the method's section made valid for that global batch over that many workers
    (``MethodConfig.fit_batch``: queues sized in whole batches...)."""
    section = build_section(get_method(method).config_cls, raw.get(method) or {}, method)
    return deep_merge(raw, {method: section.fit_batch(batch_size, workers)})


def bench_config(method: str = "swav", preset: str = "cpu", batch_size: int | None = None,
                 sets: Sequence[str] = (), augment_on: str = "cpu", source: str = "scenes") -> Config:
    """The Config the bench measures: rayssl's preset + the bench preset + ``--set``s, on one worker."""
    bp = BENCH_PRESETS[preset]
    raw = resolve_preset(bp["preset"], "scenes", method)
    raw = deep_merge(raw, {k: v for k, v in bp["overrides"].items() if k in SECTIONS or k == method})
    b = batch_size or bp["batch_size"]
    raw = deep_merge(raw, {"run": {"method": method, "num_workers": 1, "batch_size": b},
                           "data": {"augment_on": augment_on, "source": source}})
    raw = fitted(raw, method, b, 1)
    return Config.from_dict(apply_assignments(raw, sets))


def bench_warmup(cfg: Config, given: int | None = None) -> int:
    """Untimed steps before a measurement: ``given``, else until every part of the method's step
    runs (its queue full of real keys), and at least 2."""
    return given if given is not None else max(2, cfg.method.warmup_steps(cfg.run.batch_size) + 1)


def ingest_config(data: dict, preset: str = "quick", batch_size: int = 32, sets: Sequence[str] = ()) -> Config:
    """The training pipeline's config for the ingest measurement (``data``: the data keys given)."""
    raw = {k: v for k, v in resolve_preset(preset, data["source"]).items() if k in SECTIONS}
    raw = deep_merge(raw, {"data": data, "run": {"method": "swav", "num_workers": 1, "batch_size": batch_size}})
    return Config.from_dict(apply_assignments(raw, sets))
