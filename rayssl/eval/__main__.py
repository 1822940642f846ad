"""``python -m rayssl.eval``: score a pretrained backbone on frozen features.

    python -m rayssl.eval --checkpoint RUN_OR_CHECKPOINT --data scenes|PATH|URI [--labels URI]
                          --protocol knn|linear|multilabel-linear

Protocols: ``knn`` (weighted cosine kNN top-1), ``linear`` (softmax linear probe top-1),
``multilabel-linear`` (sigmoid/BCE linear probe, macro mAP). Data: the built-in scenes
(held-out streams, never the training scenes), a folder / ``s3://`` prefix of images in an
ImageFolder layout (class = parent folder), or images / ``.tar`` / Parquet shards with a
labels table (CSV or Parquet: an id column -- file stem, path or key -- and a class column;
several classes joined by ``|``). Unless ``--test-data`` is given, the labelled images are split
into train / test with ``--test-fraction`` (seeded).

Features come from a Ray Data batch-inference job (``rayssl.eval.job``: actors holding the
backbone, on GPUs when the cluster has them). A table goes to stdout, then one JSON line as
the last line; progress goes to stderr. Bad input stops before Ray starts with one line
naming the option.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch

from rayssl.checkpoint import CheckpointError
from rayssl.data.sources import DataError, resolve_source
from rayssl.eval.loading import LoadedCheckpoint, backbone_state_dict, load_checkpoint
from rayssl.storage import S3Options, add_s3_flags, configure_s3

PROTOCOLS = ("knn", "linear", "multilabel-linear")
METRIC = {"knn": "knn_top1", "linear": "linear_top1", "multilabel-linear": "linear_map"}


class EvalError(ValueError):
    """Bad evaluation input (one line naming the option)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayssl.eval",
                                description="Evaluate the frozen backbone of a rayssl checkpoint (kNN / linear probes).")
    p.add_argument("--checkpoint", required=True,
                   help="rayssl checkpoint directory, or a run directory (its newest complete checkpoint); local or s3://")
    p.add_argument("--data", default="scenes",
                   help="'scenes' (built-in held-out scenes), an ImageFolder folder/prefix (class = parent folder), or "
                        "images / .tar / .parquet shards with --labels")
    p.add_argument("--labels", default=None,
                   help="labels table (.csv / .parquet: id + class column, classes joined by '|') or an ImageFolder "
                        "tree; default: the class folders of --data")
    p.add_argument("--protocol", choices=PROTOCOLS, default="knn",
                   help="knn: cosine kNN top-1; linear: linear-probe top-1; multilabel-linear: linear-probe mAP")
    p.add_argument("--test-data", default=None, help="held-out images (same forms as --data); default: split --data")
    p.add_argument("--test-labels", default=None, help="labels of --test-data (default: its class folders, or --labels)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share when --data is split (default 0.2)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    p.add_argument("--num-train", type=int, default=1000, help="scenes: labelled training images (default 1000)")
    p.add_argument("--num-test", type=int, default=500, help="scenes: held-out test images (default 500)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size for the backbone (default: the checkpoint's large-crop size)")
    p.add_argument("--seed", type=int, default=0, help="scenes stream / split / probe seed (default 0)")
    p.add_argument("--use-gpu", choices=["auto", "true", "false"], default="auto",
                   help="run the inference actors on GPUs (auto: when the cluster has them)")
    p.add_argument("--actors", type=int, default=None, help="inference actors (default: one per GPU, else 1)")
    p.add_argument("--batch-size", type=int, default=128, help="images per inference batch (default 128)")
    p.add_argument("--baseline", action="store_true",
                   help="also score a randomly initialised backbone of the same architecture")
    p.add_argument("--parquet-image-column", default="image", help="Parquet column holding encoded images")
    add_s3_flags(p)
    return p


def _log(msg: str) -> None:
    sys.stderr.write(f"[rayssl.eval] {msg}\n")
    sys.stderr.flush()


def _check_args(args) -> None:
    if args.k < 1:
        raise EvalError(f"--k: must be >= 1, got {args.k}")
    if args.temperature <= 0:
        raise EvalError(f"--temperature: must be > 0, got {args.temperature}")
    if args.num_train < 2 or args.num_test < 1:
        raise EvalError("--num-train must be >= 2 and --num-test >= 1")
    if args.image_size is not None and args.image_size < 8:
        raise EvalError(f"--image-size: must be >= 8, got {args.image_size}")
    if args.actors is not None and args.actors < 1:
        raise EvalError(f"--actors: must be >= 1, got {args.actors}")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.data == "scenes" and (args.labels or args.test_data):
        raise EvalError("--labels/--test-data: the built-in scenes carry their own labels; drop these options")


# ------------------------------------------------------------------ labelled sources


class LabelledSource:
    """A data URI resolved with its labels, checked before any image is read."""

    def __init__(self, data: str, labels_uri: str | None, flag: str, labels_flag: str, options: S3Options,
                 image_column: str):
        from rayssl.data.sources import _ID_COLUMNS, _image_id, load_labels

        self.source = resolve_source(data, options, image_column=image_column)
        self.labels_uri = labels_uri or data
        if labels_uri is None and self.source.kind != "images":
            raise EvalError(f"{labels_flag}: {flag} {data} holds {self.source.kind} shards, which have no class "
                            f"folders; give a labels table with {labels_flag}")
        try:
            self.labels = load_labels(self.labels_uri, options)
        except DataError as exc:
            raise EvalError(f"{labels_flag}: {exc}") from None
        self.flag, self.labels_flag, self.uri = flag, labels_flag, data
        self.ids_by_path: dict[str, str] | None = None
        self.parquet_id_column = None
        if self.source.kind == "images":
            by_id: dict[str, str] = {}
            for p in self.source.paths:
                i = _image_id(p)
                if i in by_id:
                    raise EvalError(f"{flag} {data}: two images share the id {i!r} ({by_id[i]} and {p}); "
                                    "ids are file names without extension and must be unique")
                by_id[i] = p
            self.check_ids(set(by_id))
            self.ids_by_path = {p: i for i, p in by_id.items() if i in self.labels}
        elif self.source.kind == "parquet":
            import pyarrow.parquet as pq

            with self.source.fs.open(self.source.paths[0], "rb") as f:
                names = pq.read_schema(f).names
            wanted = [c for c in _ID_COLUMNS if c != image_column]
            found = [n for n in names if n.lower() in wanted]
            if not found:
                raise EvalError(f"{flag} {data}: the Parquet shards have no id column to match {labels_flag} "
                                f"(looked for {', '.join(wanted)}; has {', '.join(names)})")
            self.parquet_id_column = found[0]

    def check_ids(self, present: set[str]) -> None:
        missing = sorted(set(self.labels) - present)
        if missing:
            first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise EvalError(f"{self.labels_flag} {self.labels_uri}: {len(missing)} of the {len(self.labels)} images "
                            f"it names are not in {self.flag} {self.uri} (first: {first})")


def _features_for(ls: LabelledSource, ckpt: LoadedCheckpoint, state, size, use_gpu, actors, batch_size):
    from rayssl.eval.job import source_features

    table = source_features(ls.source, ls.ids_by_path, ckpt.backbone_name, ckpt.small_stem, state, size=size,
                            use_gpu=use_gpu, actors=actors, batch_size=batch_size,
                            parquet_id_column=ls.parquet_id_column)
    if ls.ids_by_path is None:  # shards: their ids are only known now
        ls.check_ids(set(table.ids))
    keep = [r for r, i in enumerate(table.ids) if i in ls.labels]
    ids = [table.ids[r] for r in keep]
    return ids, table.features[keep], [ls.labels[i] for i in ids], table.skipped


# ------------------------------------------------------------------ scoring


def score(protocol: str, f_tr, y_tr, f_te, y_te, args) -> float:
    from rayssl.eval import knn_top1, linear_probe_map, linear_probe_top1

    f_tr, f_te = torch.as_tensor(f_tr), torch.as_tensor(f_te)
    if protocol == "knn":
        return knn_top1(f_tr, torch.as_tensor(y_tr), f_te, torch.as_tensor(y_te), k=args.k,
                        temperature=args.temperature)
    if protocol == "linear":
        return linear_probe_top1(f_tr, torch.as_tensor(y_tr), f_te, torch.as_tensor(y_te), seed=args.seed)
    return linear_probe_map(f_tr, torch.as_tensor(y_tr).float(), f_te, torch.as_tensor(y_te).float(), seed=args.seed)


def _targets(protocol: str, label_sets: list[tuple[str, ...]], classes: list[str], flag: str):
    from rayssl.eval.preprocess import label_matrix

    y, _ = label_matrix(label_sets, classes)
    if protocol == "multilabel-linear":
        return y
    multi = int((y.sum(1) != 1).sum())
    if multi:
        raise EvalError(f"{flag}: --protocol {protocol} needs exactly one class per image, but {multi} images have "
                        "several (or none); use --protocol multilabel-linear")
    return y.argmax(1)


def evaluate(args, ckpt: LoadedCheckpoint) -> dict:
    import ray  # noqa: F401  (the job needs a running Ray)

    from rayssl.eval.job import scene_features
    from rayssl.eval.preprocess import split_train_test

    size = args.image_size or ckpt.image_size
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = {"auto": gpus >= 1, "true": True, "false": False}[args.use_gpu]
    if use_gpu and gpus < 1:
        raise EvalError("--use-gpu: true, but the Ray cluster has no GPU")
    actors = args.actors or (max(1, int(gpus)) if use_gpu else 1)
    state = backbone_state_dict(ckpt)
    info: dict = {"skipped": 0}

    def extract(st):
        if args.data == "scenes":
            t = scene_features(ckpt.backbone_name, ckpt.small_stem, st, seed=args.seed, n_train=args.num_train,
                               n_test=args.num_test, scene_size=ckpt.config["data"]["scenes_image_size"],
                               size=size, use_gpu=use_gpu, actors=actors, batch_size=args.batch_size)
            from rayssl.data.scenes import SHAPES

            tr = t.columns["split"] == "eval-train"
            if args.protocol == "multilabel-linear":
                y = t.columns["labels"]
            else:
                y = t.columns["label"]
            info["classes"] = list(SHAPES)
            return t.features[tr], y[tr], t.features[~tr], y[~tr]
        ids, feats, label_sets, skipped = _features_for(args._train_src, ckpt, st, size, use_gpu, actors,
                                                        args.batch_size)
        info["skipped"] = skipped
        if args._test_src is not None:
            ids_te, f_te, sets_te, sk = _features_for(args._test_src, ckpt, st, size, use_gpu, actors,
                                                      args.batch_size)
            info["skipped"] += sk
            classes = sorted({c for s in label_sets + sets_te for c in s})
            info["classes"] = classes
            return (feats, _targets(args.protocol, label_sets, classes, "--labels"),
                    f_te, _targets(args.protocol, sets_te, classes, "--test-labels"))
        classes = sorted({c for s in label_sets for c in s})
        info["classes"] = classes
        y = _targets(args.protocol, label_sets, classes, "--labels")
        tr, te = split_train_test(ids, args.test_fraction, args.seed)
        return feats[tr], y[tr], feats[te], y[te]

    t0 = time.perf_counter()
    f_tr, y_tr, f_te, y_te = extract(state)
    extract_s = time.perf_counter() - t0
    _log(f"features: {len(f_tr)} train + {len(f_te)} test images, dim {f_tr.shape[1]}, {extract_s:.1f}s "
         f"({(len(f_tr) + len(f_te)) / max(extract_s, 1e-9):.1f} img/s, {actors} {'GPU' if use_gpu else 'CPU'} actor(s))")
    metric = METRIC[args.protocol]
    result = {
        "checkpoint": ckpt.uri, "method": ckpt.method, "backbone": ckpt.backbone_name, "epoch": ckpt.epoch,
        "data": args.data, "protocol": args.protocol, "metric": metric,
        metric: round(score(args.protocol, f_tr, y_tr, f_te, y_te, args), 4),
        "num_train": int(len(f_tr)), "num_test": int(len(f_te)), "num_classes": len(info["classes"]),
        "image_size": size, "skipped_images": info["skipped"], "feature_s": round(extract_s, 1),
    }
    if args.protocol == "knn":
        result.update({"k": args.k, "temperature": args.temperature})
    if args.baseline:
        from rayssl.modules.backbone import build_backbone

        torch.manual_seed(args.seed)
        rand, _ = build_backbone(ckpt.backbone_name, small_stem=ckpt.small_stem)
        g_tr, z_tr, g_te, z_te = extract(rand.state_dict())
        result[f"{metric}_random_init"] = round(score(args.protocol, g_tr, z_tr, g_te, z_te, args), 4)
    return result


def format_table(result: dict) -> str:
    rows = [("checkpoint", result["checkpoint"]),
            ("backbone", f"{result['backbone']} ({result['method']}, epoch {result['epoch']})"),
            ("data", f"{result['data']}: {result['num_train']} train / {result['num_test']} test images, "
                     f"{result['num_classes']} classes" + (f", {result['skipped_images']} unreadable skipped"
                                                           if result["skipped_images"] else "")),
            ("protocol", result["protocol"] + (f" (k={result['k']}, T={result['temperature']})"
                                               if result["protocol"] == "knn" else ""))]
    m = result["metric"]
    rows.append((m, f"{result[m]:.4f}"))
    if f"{m}_random_init" in result:
        rows.append((f"{m} (random init)", f"{result[m + '_random_init']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = S3Options.from_args(args)
    configure_s3(options)
    prog = "python -m rayssl.eval: error:"
    try:
        _check_args(args)
        # --s3-anonymous is for a public dataset; the checkpoint is a run of the user's own,
        # read signed like every command's own files (see storage.configure_s3).
        ckpt = load_checkpoint(args.checkpoint, options.signed())
        args._train_src = args._test_src = None
        if args.data != "scenes":
            args._train_src = LabelledSource(args.data, args.labels, "--data", "--labels", options,
                                             args.parquet_image_column)
            if args.test_data:
                args._test_src = LabelledSource(args.test_data, args.test_labels or (
                    args.labels if args.labels and args.labels.endswith((".csv", ".parquet", ".pq")) else None),
                    "--test-data", "--test-labels", options, args.parquet_image_column)
    except (CheckpointError, DataError, EvalError, ValueError) as exc:
        print(f"{prog} {exc}", file=sys.stderr)
        return 2
    from rayssl.train import _ray_connected, _shutdown_ray, init_ray

    started = not _ray_connected()
    try:
        init_ray(None)
        result = evaluate(args, ckpt)
    except (EvalError, DataError, ValueError) as exc:
        print(f"{prog} {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            _shutdown_ray()
    print(format_table(result))
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
