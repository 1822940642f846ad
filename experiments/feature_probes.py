"""What a checkpoint's frozen features encode, beyond the one number a run prints.

Feeds docs/results/swav-on-scenes.md.

    python experiments/feature_probes.py RUN_OR_CHECKPOINT [...] [--num-train 2000]
        [--num-test 1000] [--seed 0] [--k 20]

For each checkpoint given and for a random-init backbone of the same architecture (torch seed
``--seed``), the weighted cosine kNN of ``rayssl.eval.probes`` on seven attributes of the same
held-out scenes (shape, colour, objects, brightness, hue, place, size; defined there). Single
process, pure PyTorch (no Ray); checkpoints may be local or s3:// (the default S3
credentials). Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from rayssl.eval.probes import ATTRIBUTES, probe_scenes


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
    torch.manual_seed(a.seed)
    backbones = {"random init": build_backbone(arch, small_stem=small_stem)[0]}
    backbones.update({ckpt.uri: frozen_backbone(ckpt) for ckpt in loaded})
    r = probe_scenes(backbones, size, a.seed, a.num_train, a.num_test, a.k)
    rows, chance = r["probes"], r["majority"]

    width = max(len(n) for n in rows)
    print(f"{'':{width}}  " + "  ".join(f"{n:>10}" for n in ATTRIBUTES), file=sys.stderr)
    for name, row in {"majority class": chance, **rows}.items():
        print(f"{name:{width}}  " + "  ".join(f"{row[n]:>10.3f}" for n in ATTRIBUTES), file=sys.stderr)
    print(json.dumps({**r, "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
