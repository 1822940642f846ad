"""Named bundles of settings, applied between the paper defaults and the user's YAML.

``quick`` makes ``python -m rayssl.train`` with no arguments finish in a few minutes on a
2-core laptop (ResNet-18, 256 prototypes, SGD; SwAV on 32 px scenes with the small-image
stem, the other methods on 64 px scenes with the standard stem).
``paper`` is the SwAV paper's ImageNet recipe (ResNet-50, 2x224 + 6x96 crops, batch 4096
on 64 GPUs in the paper); it is the dataclass defaults plus nothing, stated explicitly so
``--preset paper`` reads as what it is.
"""

from __future__ import annotations

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
        # The standard stem brings 64 px crops to 16 x 16 at layer1 (SwAV overrides it below).
        "model": {"backbone": "resnet18", "small_stem": False},
        # Plain SGD: at batch 64 LARS's trust ratio (eta 0.001) leaves the weights nearly still.
        "optim": {"optimizer": "sgd", "base_lr": 0.2, "warmup_epochs": 1.0, "weight_decay": 1e-5},
        "eval": {"num_train_images": 1000, "num_test_images": 500},
        "swav": {
            "num_prototypes": 256,
            "projection_hidden_dim": 512,
            "projection_dim": 128,
            "queue_length": 0,
            "freeze_prototypes_iters": 32,
        },
    },
    "paper": {},
}

# Per-method adjustments of a preset: MLS/MoCo compare two views only (no small crops)
# and train with SGD as MoCo-v2 does.
_MLS_QUICK = {
    "data": {"crop_sizes": [64], "crop_counts": [2], "min_scale": [0.25], "max_scale": [1.0]},
    "optim": {"optimizer": "sgd", "base_lr": 0.12, "weight_decay": 1e-4, "warmup_epochs": 1.0},
}
# SwAV's default run: 32 px scenes through the small-image stem (3x3 stride-1 conv, no
# max-pool), 4 epochs. With the standard stem on 64 px scenes a 32 px crop is 1 x 1 at
# layer4 and SwAV ended below its random init on every recipe tried (README, "Measured");
# with the small stem its kNN ended above its own random init on 6 of 8 seeds (mean +0.016,
# s.e. 0.007) at 128 steps (benchmarks/swav_trials.py). The small stem costs about 2.7x a step, so
# the run is 4 epochs, not 8, to stay within 10 minutes on 2 CPU cores.
_SWAV_QUICK = {
    "run": {"epochs": 4},
    "data": {"scenes_image_size": 32, "crop_sizes": [32, 16]},
    "model": {"small_stem": True},
}
METHOD_PRESETS: dict[str, dict[str, dict]] = {
    "quick": {
        "swav": _SWAV_QUICK,
        "mls": {**_MLS_QUICK, "mls": {"queue_size": 1024, "k": 10, "momentum": 0.99,
                                      "projection_hidden_dim": 512, "projection_dim": 128}},
        "moco": {**_MLS_QUICK, "moco": {"queue_size": 1024, "momentum": 0.99,
                                        "projection_hidden_dim": 512, "projection_dim": 128}},
    },
    "paper": {
        "mls": {"optim": {"optimizer": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0}},
        "moco": {"optim": {"optimizer": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0}},
    },
}


# Methods that train on the first crop group only (CDUL classifies the large views): any
# further group would be decoded, augmented and shipped to the workers for nothing, so their
# presets keep the first group of the data section they would otherwise get.
FIRST_CROP_GROUP_ONLY = ("cdul",)
CROP_GROUP_KEYS = ("crop_sizes", "crop_counts", "min_scale", "max_scale")


def preset_names() -> list[str]:
    return list(PRESETS)


def resolve_preset(name: str, data_source: str, method: str = "swav") -> dict:
    """The preset's sections for ``method``.

    ``auto`` -> ``quick`` on the built-in scenes, ``paper`` on real data. Sections of other
    methods are dropped; the method's own adjustments are merged in.
    """
    from rayssl.config import SECTIONS, deep_merge

    if name == "auto":
        name = "quick" if data_source == "scenes" else "paper"
    base = {k: v for k, v in PRESETS[name].items() if k in SECTIONS or k == method}
    out = deep_merge(base, METHOD_PRESETS.get(name, {}).get(method, {}))
    if method in FIRST_CROP_GROUP_ONLY:
        import dataclasses

        from rayssl.config import DataSection

        data = {**dataclasses.asdict(DataSection()), **out.get("data", {})}
        out = deep_merge(out, {"data": {k: list(data[k][:1]) for k in CROP_GROUP_KEYS}})
    return out
