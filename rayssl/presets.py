"""Named bundles of settings, applied between the paper defaults and the user's YAML.

``quick`` makes ``python -m rayssl.train`` with no arguments finish in a few minutes on a
2-core laptop (ResNet-18 on 64 px scenes, SGD); ``paper`` is the papers' recipe (the dataclass
defaults: ResNet-50, 2x224 + 6x96 crops, LARS...), stated explicitly so ``--preset paper``
reads as what it is. Each method adds its own changes to a preset where it registers itself
(``rayssl.methods``: SwAV's quick run uses 32 px scenes and the small-image stem, MLS/MoCo
two views and MoCo-v2's SGD, CDUL the first crop group only).
"""

from __future__ import annotations

from rayssl.config import Config
from rayssl.methods import get_method, method_names
from rayssl.sections import SECTIONS, ConfigError, RunSection, deep_merge

PRESETS: dict[str, dict] = {
    "quick": {
        "run": {"epochs": 8, "batch_size": 64, "checkpoint_every_epochs": 2, "log_every_steps": 8},
        "data": {
            "scenes_num_images": 2048,
            "scenes_image_size": 64,
            "crop_sizes": [64, 32],
            "crop_counts": [2, 4],
            # Milder than the paper's ImageNet recipe: on 64 px scenes the paper's scales and
            # jitter leave two views of an image no closer than two images at initialisation,
            # and the embeddings collapse before they learn invariance (measured).
            "min_scale": [0.5, 0.2],
            "max_scale": [1.0, 0.5],
            "color_jitter": 0.4,
            "grayscale_p": 0.1,
            "blur_p": 0.0,
            "shuffle_buffer": 256,
        },
        # The standard stem brings 64 px crops to 16 x 16 at layer1.
        "model": {"backbone": "resnet18", "small_stem": False},
        # Plain SGD: at batch 64 LARS's trust ratio (eta 0.001) leaves the weights nearly still.
        "optim": {"optimizer": "sgd", "base_lr": 0.2, "warmup_epochs": 1.0, "weight_decay": 1e-5},
        "eval": {"num_train_images": 1000, "num_test_images": 500},
    },
    "paper": {},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def resolve_preset(name: str, data_source: str, method: str = "swav") -> dict:
    """The preset's sections for ``method``: the shared bundle with the method's own changes.

    ``auto`` -> ``quick`` on the built-in scenes, ``paper`` on real data.
    """
    if name == "auto":
        name = "quick" if data_source == "scenes" else "paper"
    base = {k: v for k, v in PRESETS[name].items() if k in SECTIONS}
    return deep_merge(base, get_method(method).presets.get(name, {}))


def layered_config(overrides: dict, file_cfg: dict | None = None, preset: str = "auto") -> Config:
    """A run's Config, settings resolved in order (later wins): the paper defaults < ``preset``
    (for the method and data source the later layers name) < ``file_cfg`` (a ``--config``
    file's sections) < ``overrides`` (flags, ``--set``)."""
    file_cfg = file_cfg or {}
    method = (overrides.get("run", {}).get("method") or file_cfg.get("run", {}).get("method")
              or RunSection.method)
    if method not in method_names():
        raise ConfigError(f"--method: unknown method {method!r}; choose one of {', '.join(method_names())}")
    source = overrides.get("data", {}).get("source") or file_cfg.get("data", {}).get("source") or "scenes"
    raw = deep_merge(deep_merge(resolve_preset(preset, source, method), file_cfg), overrides)
    raw.setdefault("run", {})["method"] = method
    return Config.from_dict(raw)
