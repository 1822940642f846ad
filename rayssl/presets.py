"""Named bundles of settings, applied between the paper defaults and the user's YAML.

``quick`` makes ``python -m rayssl.train`` with no arguments finish in a few minutes on a
2-core laptop (small scenes, ResNet-18 with the small-image stem, few prototypes).
``paper`` is the SwAV paper's ImageNet recipe (ResNet-50, 2x224 + 6x96 crops, batch 4096
on 64 GPUs in the paper); it is the dataclass defaults plus nothing, stated explicitly so
``--preset paper`` reads as what it is.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "quick": {
        "run": {"epochs": 4, "batch_size": 64, "checkpoint_every_epochs": 1, "log_every_steps": 5},
        "data": {
            "scenes_num_images": 1536,
            "scenes_image_size": 32,
            "crop_sizes": [32, 16],
            "crop_counts": [2, 2],
            "min_scale": [0.3, 0.1],
            "max_scale": [1.0, 0.3],
            "shuffle_buffer": 256,
        },
        "model": {"backbone": "resnet18", "small_stem": True},
        "optim": {"base_lr": 0.6, "warmup_epochs": 1.0, "weight_decay": 1e-5},
        "eval": {"num_train_images": 1000, "num_test_images": 500},
        "swav": {
            "num_prototypes": 128,
            "projection_hidden_dim": 512,
            "projection_dim": 64,
            "queue_length": 0,
            "freeze_prototypes_iters": 10,
        },
    },
    "paper": {},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def resolve_preset(name: str, data_source: str) -> dict:
    """``auto`` -> ``quick`` on the built-in scenes, ``paper`` on real data."""
    if name == "auto":
        name = "quick" if data_source == "scenes" else "paper"
    return PRESETS[name]
