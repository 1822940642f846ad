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
        "run": {"epochs": 8, "batch_size": 64, "checkpoint_every_epochs": 2, "log_every_steps": 8},
        "data": {
            "scenes_num_images": 2048,
            "scenes_image_size": 64,
            "crop_sizes": [64, 32],
            "crop_counts": [2, 4],
            "min_scale": [0.25, 0.08],
            "max_scale": [1.0, 0.25],
            "shuffle_buffer": 256,
        },
        # The standard stem brings 64 px crops to 16 x 16 at layer1: 3x cheaper than the
        # small stem on 32 px crops, with more pixels of each shape.
        "model": {"backbone": "resnet18", "small_stem": False},
        "optim": {"base_lr": 0.6, "lars_eta": 0.02, "warmup_epochs": 1.0, "weight_decay": 1e-6},
        "eval": {"num_train_images": 1000, "num_test_images": 500},
        "swav": {
            # K > projection_dim: no direction is equidistant from every prototype, so the
            # embeddings cannot collapse to uniform predictions (seen here with K <= d).
            "num_prototypes": 100,
            "projection_hidden_dim": 512,
            "projection_dim": 32,
            "queue_length": 0,
            "freeze_prototypes_iters": 32,
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
