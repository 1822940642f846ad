"""What a checkpoint's frozen features encode, beyond the one number a run prints.

Feeds docs/results/swav-on-scenes.md.

    python experiments/feature_probes.py RUN_OR_CHECKPOINT [...] [--num-train 2000]
        [--num-test 1000] [--seed 0] [--k 20]

The training summary reports kNN top-1 of the *dominant shape* on held-out scenes. When that
number does not move, this asks what the backbone did learn: the same weighted cosine kNN
(k, T = 0.07, as in training's evaluation) on seven attributes of the same held-out scenes,
for each checkpoint given and for a random-init backbone of the same architecture (torch
seed ``--seed``):

    shape       the dominant object's shape (the run's own metric; 12 classes)
    colour      the dominant object's named colour (10)
    objects     how many objects the scene holds (1-4)
    brightness  the image's mean brightness, by quartile of the training set (4)
    hue         the hue of the image's mean colour, in sixths of the circle (6)
    place       the dominant object's centre, in a 3 x 3 grid over the image (9)
    size        the dominant object's radius, by tercile of the training set (3)

An attribute that falls from random init towards chance is one the training made the
features invariant to; one that rises is one it learned. Single process, pure PyTorch (no
Ray); checkpoints may be local or s3:// (the default S3 credentials). Last stdout line:
one JSON object.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import sys
import time

import numpy as np
import torch

from rayssl.data.scenes import COLOURS
from rayssl.eval.features import extract_features, scenes_eval_sets
from rayssl.eval.knn import knn_top1

ATTRIBUTES = ("shape", "colour", "objects", "brightness", "hue", "place", "size")
_COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}


def _caption_objects(caption: str) -> list[tuple[str, str]]:
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
    objects = [_caption_objects(str(c)) for c in scenes["caption"]]
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
          k: int = 20) -> dict[str, float]:
    """kNN top-1 of every attribute from ``backbone``'s frozen features."""
    train, test = sets
    f_tr = extract_features(backbone, train["image"], size, "cpu")
    f_te = extract_features(backbone, test["image"], size, "cpu")
    return {a: round(knn_top1(f_tr, labels[0][a], f_te, labels[1][a], k=k), 4) for a in ATTRIBUTES}


def main(argv=None) -> int:
    from rayssl.checkpoint import CheckpointError
    from rayssl.checkpoint import load_checkpoint
    from rayssl.modules.pretrained import frozen_backbone
    from rayssl.modules.backbone import build_backbone

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="run directories or checkpoint directories (local or s3://)")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="scene streams and the random-init backbone")
    p.add_argument("--k", type=int, default=20)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:  # fail on a bad path before any work
        loaded = [load_checkpoint(uri) for uri in a.checkpoints]
    except CheckpointError as exc:
        p.error(str(exc))
    sizes = {int(c.config["data"]["scenes_image_size"]) for c in loaded}
    archs = {(c.backbone_name, c.small_stem) for c in loaded}
    if len(sizes) != 1 or len(archs) != 1:
        p.error(f"the checkpoints differ in image size {sorted(sizes)} or backbone {sorted(archs)}; probe them separately")
    size, (arch, small_stem) = sizes.pop(), archs.pop()
    sets = scenes_eval_sets(a.seed, size, a.num_train, a.num_test)
    edges = quantile_edges(sets[0])
    labels = (attribute_labels(sets[0], edges), attribute_labels(sets[1], edges))
    chance = {name: round(float(np.bincount(labels[1][name].numpy()).max() / a.num_test), 4) for name in ATTRIBUTES}

    torch.manual_seed(a.seed)
    rows = {"random init": probe(build_backbone(arch, small_stem=small_stem)[0], sets, labels, size, a.k)}
    for ckpt in loaded:
        rows[ckpt.uri] = probe(frozen_backbone(ckpt), sets, labels, size, a.k)

    width = max(len(n) for n in rows)
    print(f"{'':{width}}  " + "  ".join(f"{n:>10}" for n in ATTRIBUTES), file=sys.stderr)
    for name, row in {"majority class": chance, **rows}.items():
        print(f"{name:{width}}  " + "  ".join(f"{row[n]:>10.3f}" for n in ATTRIBUTES), file=sys.stderr)
    print(json.dumps({"num_train": a.num_train, "num_test": a.num_test, "seed": a.seed, "k": a.k,
                      "majority": chance, "probes": rows, "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
