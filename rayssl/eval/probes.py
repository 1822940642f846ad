"""What frozen features encode about the built-in scenes, beyond the one number a run prints.

The training summary reports kNN top-1 of the *dominant shape* on held-out scenes. When that
number does not move, ``probe_scenes`` asks what a backbone did learn: the same weighted cosine
kNN (k, T = 0.07, as in training's evaluation) on seven attributes of the same held-out scenes:

    shape       the dominant object's shape (the run's own metric; 12 classes)
    colour      the dominant object's named colour (10)
    objects     how many objects the scene holds (1-4)
    brightness  the image's mean brightness, by quartile of the training set (4)
    hue         the hue of the image's mean colour, in sixths of the circle (6)
    place       the dominant object's centre, in a 3 x 3 grid over the image (9)
    size        the dominant object's radius, by tercile of the training set (3)

An attribute that falls from random init towards chance is one the training made the
features invariant to; one that rises is one it learned. Used by
``experiments/feature_probes.py`` (checkpoints) and the GPU check's quality run. Pure PyTorch.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch

from rayssl.data.scenes import COLOURS
from rayssl.eval.features import extract_features, scenes_eval_sets
from rayssl.eval.knn import knn_top1

__all__ = ["ATTRIBUTES", "attribute_labels", "caption_objects", "probe", "probe_scenes", "quantile_edges"]

ATTRIBUTES = ("shape", "colour", "objects", "brightness", "hue", "place", "size")
_COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """``"a red star, a blue ring and an orange tee"`` -> [("red", "star"), ...], dominant first."""
    parts = caption.replace(" and ", ", ").split(", ")
    out = []
    for part in parts:
        words = part.split()
        if len(words) != 3 or words[0] not in ("a", "an") or words[1] not in _COLOUR_INDEX:
            raise ValueError(f"unexpected scene caption part {part!r} in {caption!r}")
        out.append((words[1], words[2]))
    return out


def attribute_labels(scenes: dict, edges: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """(N,) int64 labels of every attribute for a ``generate_batch`` dict; ``edges`` from
    ``quantile_edges`` of the training set."""
    objects = [caption_objects(str(c)) for c in scenes["caption"]]
    mean_rgb = _mean_rgb(scenes)
    place = np.asarray(scenes["place"], dtype=np.float64)
    cell = np.clip((place[:, :2] * 3).astype(np.int64), 0, 2)  # (column, row) of the centre
    hue = [int(colorsys.rgb_to_hsv(*rgb)[0] * 6) % 6 for rgb in mean_rgb]
    return {
        "shape": torch.from_numpy(np.asarray(scenes["label"], dtype=np.int64)),
        "colour": torch.tensor([_COLOUR_INDEX[o[0][0]] for o in objects]),
        "objects": torch.tensor([len(o) - 1 for o in objects]),
        "brightness": torch.from_numpy(np.digitize(mean_rgb.mean(axis=1), edges["brightness"]).astype(np.int64)),
        "hue": torch.tensor(hue),
        "place": torch.from_numpy(cell[:, 1] * 3 + cell[:, 0]),
        "size": torch.from_numpy(np.digitize(place[:, 2], edges["size"]).astype(np.int64)),
    }


def _mean_rgb(scenes: dict) -> np.ndarray:
    """(N, 3) mean colour of each image in [0, 1]; its mean over channels is the brightness."""
    return scenes["image"].reshape(len(scenes["image"]), -1, 3).mean(axis=1) / 255.0


def quantile_edges(scenes: dict) -> dict[str, np.ndarray]:
    """Brightness quartiles and dominant-radius terciles of ``scenes`` (the training set)."""
    return {"brightness": np.quantile(_mean_rgb(scenes).mean(axis=1), [0.25, 0.5, 0.75]),
            "size": np.quantile(np.asarray(scenes["place"])[:, 2], [1 / 3, 2 / 3])}


def probe(backbone: torch.nn.Module, sets: tuple[dict, dict], labels: tuple[dict, dict], size: int,
          k: int = 20, device="cpu", temperature: float = 0.07) -> dict[str, float]:
    """kNN top-1 of every attribute from ``backbone``'s frozen features (computed on ``device``)."""
    train, test = sets
    f_tr = extract_features(backbone, train["image"], size, device)
    f_te = extract_features(backbone, test["image"], size, device)
    return {a: round(knn_top1(f_tr, labels[0][a], f_te, labels[1][a], k=k, temperature=temperature), 4)
            for a in ATTRIBUTES}


def probe_scenes(backbones: dict[str, torch.nn.Module], size: int, seed: int = 0, num_train: int = 2000,
                 num_test: int = 1000, k: int = 20, device="cpu", temperature: float = 0.07) -> dict:
    """Every attribute's kNN top-1 for each of ``backbones`` (name -> module) on held-out scenes
    of ``size`` px (streams of ``seed``), beside each attribute's majority-class share."""
    sets = scenes_eval_sets(seed, size, num_train, num_test)
    edges = quantile_edges(sets[0])
    labels = (attribute_labels(sets[0], edges), attribute_labels(sets[1], edges))
    majority = {a: round(float(np.bincount(labels[1][a].numpy()).max() / num_test), 4) for a in ATTRIBUTES}
    return {"num_train": num_train, "num_test": num_test, "seed": seed, "k": k, "majority": majority,
            "probes": {name: probe(b, sets, labels, size, k, device, temperature) for name, b in backbones.items()}}
