"""Scoring a checkpoint's frozen backbone: kNN or linear probes on labelled images (``rayssl eval``).

Protocols: ``knn`` (weighted cosine kNN top-1), ``linear`` (softmax linear probe top-1),
``multilabel-linear`` (sigmoid/BCE linear probe, macro mAP). Data: the built-in scenes
(held-out streams, never the training scenes), a folder / ``s3://`` prefix of images in an
ImageFolder layout (class = parent folder), or images / ``.tar`` / Parquet shards with a
labels table (CSV or Parquet: an id column -- file stem, path or key -- and a class column;
several classes joined by ``|``). Unless a test set is given, the labelled images are split
into train / test with ``test_fraction`` (seeded).

``open_sources`` checks the data and labels before any image is read; ``evaluate`` extracts the
features with a Ray Data batch-inference job (``rayssl.eval.job``: actors holding the backbone,
on GPUs when the cluster has them) and scores them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow.parquet as pq
import torch

from rayssl.checkpoint import LoadedCheckpoint, backbone_state_dict
from rayssl.data.labels import ID_COLUMNS, image_id, load_labels, own_folder_labels
from rayssl.data.scenes import SHAPES
from rayssl.data.sources import DataError, resolve_source
from rayssl.eval.features import feature_batch
from rayssl.eval.job import ActorPool, FeatureTable, scene_features, source_features
from rayssl.eval.knn import knn_top1
from rayssl.eval.linear import linear_probe_map, linear_probe_top1
from rayssl.eval.preprocess import label_matrix, split_train_test
from rayssl.modules.backbone import build_backbone
from rayssl.modules.seeding import cpu_seeded
from rayssl.sections import EvalSection
from rayssl.storage import S3Options

PROTOCOLS = ("knn", "linear", "multilabel-linear")
METRIC = {"knn": "knn_top1", "linear": "linear_top1", "multilabel-linear": "linear_map"}

__all__ = ["METRIC", "PROTOCOLS", "EvalError", "EvalRequest", "Extractor", "LabelledSource", "Sources", "evaluate",
           "format_table", "labelled_split", "open_run_sources", "open_sources", "resolve_protocol", "run_metric",
           "run_request"]


class EvalError(ValueError):
    """Bad evaluation input (one line naming the option)."""


def log(msg: str) -> None:
    sys.stderr.write(f"[rayssl.eval] {msg}\n")
    sys.stderr.flush()


@dataclass
class EvalRequest:
    """What to evaluate and how (the options of ``rayssl eval``)."""

    data: str = "scenes"
    labels: str | None = None
    protocol: str = "knn"
    test_data: str | None = None
    test_labels: str | None = None
    test_fraction: float = 0.2
    k: int = 20
    temperature: float = 0.07
    num_train: int = 1000  # scenes: labelled training images
    num_test: int = 500  # scenes: held-out test images
    image_size: int | None = None  # default: the checkpoint's large-crop size
    seed: int = 0
    batch_size: int | None = None  # images per inference batch; None: 64 on CPU actors, 256 on GPU ones
    baseline: bool = False  # also score a randomly initialised backbone of the same architecture
    parquet_image_column: str = "image"

    def check(self) -> None:
        """EvalError (one line naming the option) for a request that cannot work."""
        if self.protocol not in PROTOCOLS:
            raise EvalError(f"--protocol: choose one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.k < 1:
            raise EvalError(f"--k: must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise EvalError(f"--temperature: must be > 0, got {self.temperature}")
        if self.num_train < 2 or self.num_test < 1:
            raise EvalError("--num-train must be >= 2 and --num-test >= 1")
        if self.image_size is not None and self.image_size < 8:
            raise EvalError(f"--image-size: must be >= 8, got {self.image_size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise EvalError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.data == "scenes" and (self.labels or self.test_data):
            raise EvalError("--labels/--test-data: the built-in scenes carry their own labels; drop these options")


# ------------------------------------------------------------------ labelled sources



class LabelledSource:
    """A data URI resolved with its labels, checked before any image is read."""

    def __init__(self, data: str, labels_uri: str | None, flag: str, labels_flag: str, options: S3Options,
                 image_column: str):
        self.source = resolve_source(data, options, image_column=image_column)
        self.labels_uri = labels_uri or data
        if labels_uri is None and self.source.kind != "images":
            table = (self.source.manifest or {}).get("labels")  # written by rayssl shards beside its shards
            if not table:
                raise EvalError(f"{labels_flag}: {flag} {data} holds {self.source.kind} shards without a labels "
                                f"table in their manifest.json (rayssl shards writes one for scenes and for "
                                f"files given --labels); give a labels table with {labels_flag}")
            self.labels_uri = self.source.beside(table)
        self.flag, self.labels_flag, self.uri = flag, labels_flag, data
        self.ids_by_path: dict[str, str] | None = None
        self.parquet_id_column = None
        try:
            # Labelled by its own class folders: matched by the path below the root, so class
            # folders may repeat file names (cat/0001.jpg, dog/0001.jpg).
            found = own_folder_labels(self.labels_uri, data, self.source.paths, options) \
                if self.source.kind == "images" else None
            if found is not None:
                self.labels = {i: (cls,) for i, cls in found.values()}
                self.ids_by_path = {p: i for p, (i, _) in found.items()}
                return
            self.labels = load_labels(self.labels_uri, options)
        except DataError as exc:
            raise EvalError(f"{labels_flag}: {exc}") from None
        if self.source.kind == "images":
            by_id: dict[str, str] = {}
            for p in self.source.paths:
                i = image_id(p)
                if i in by_id:
                    raise EvalError(f"{flag} {data}: two images share the id {i!r} ({by_id[i]} and {p}); ids "
                                    f"are file names without extension, matched to {labels_flag}, and must be "
                                    "unique")
                by_id[i] = p
            self.check_ids(set(by_id))
            self.ids_by_path = {p: i for i, p in by_id.items() if i in self.labels}
        elif self.source.kind == "parquet":
            with self.source.fs.open(self.source.paths[0], "rb") as f:
                names = pq.read_schema(f).names
            wanted = [c for c in ID_COLUMNS if c != image_column]
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


# (labelled source, backbone state, input size) -> its features; default: the Ray Data job
Extractor = Callable[[LabelledSource, dict, int], FeatureTable]


def _features_for(ls: LabelledSource, state, size, extract: Extractor):
    table = extract(ls, state, size)
    if ls.ids_by_path is None:  # shards: their ids are only known now
        ls.check_ids(set(table.ids))
    keep = [r for r, i in enumerate(table.ids) if i in ls.labels]
    ids = [table.ids[r] for r in keep]
    return ids, table.features[keep], [ls.labels[i] for i in ids], table.skipped


# ------------------------------------------------------------------ scoring


def score(protocol: str, f_tr, y_tr, f_te, y_te, req: "EvalRequest") -> float:
    f_tr, f_te = torch.as_tensor(f_tr), torch.as_tensor(f_te)
    if protocol == "knn":
        return knn_top1(f_tr, torch.as_tensor(y_tr), f_te, torch.as_tensor(y_te), k=req.k,
                        temperature=req.temperature)
    if protocol == "linear":
        return linear_probe_top1(f_tr, torch.as_tensor(y_tr), f_te, torch.as_tensor(y_te), seed=req.seed)
    return linear_probe_map(f_tr, torch.as_tensor(y_tr).float(), f_te, torch.as_tensor(y_te).float(), seed=req.seed)


def labelled_split(protocol: str, ids: list[str], rows, label_sets: list[tuple[str, ...]], test=None, *,
                   test_fraction: float, seed: int, flags: tuple[str, str] = ("--labels", "--test-labels")):
    """The training and test rows (features, or images) of labelled images with their targets
    over the classes of both: the test split is ``test`` = (rows, label sets) when given, else a
    seeded ``test_fraction`` of ``ids``. Returns (rows_tr, y_tr, rows_te, y_te, classes)."""
    if test is not None:
        rows_te, sets_te = test
        classes = sorted({c for s in label_sets + sets_te for c in s})
        return (rows, _targets(protocol, label_sets, classes, flags[0]),
                rows_te, _targets(protocol, sets_te, classes, flags[1]), classes)
    classes = sorted({c for s in label_sets for c in s})
    y = _targets(protocol, label_sets, classes, flags[0])
    tr, te = split_train_test(ids, test_fraction, seed)
    return rows[tr], y[tr], rows[te], y[te], classes


def _targets(protocol: str, label_sets: list[tuple[str, ...]], classes: list[str], flag: str):
    y, _ = label_matrix(label_sets, classes)
    if protocol == "multilabel-linear":
        return y
    multi = int((y.sum(1) != 1).sum())
    if multi:
        raise EvalError(f"{flag}: --protocol {protocol} needs exactly one class per image, but {multi} images have "
                        "several (or none); use --protocol multilabel-linear")
    return y.argmax(1)

@dataclass
class Sources:
    """The labelled images of a request: ``train`` (split into train / test unless ``test`` is
    given); both None for the built-in scenes."""

    train: LabelledSource | None = None
    test: LabelledSource | None = None


def open_sources(req: EvalRequest, options: S3Options, flag_prefix: str = "--") -> Sources:
    """Resolve and check the request's data and labels, before any image is read. Errors name
    the options as ``{flag_prefix}data`` ... (``--eval-`` for a training run's)."""
    req.check()
    if req.data == "scenes":
        return Sources()
    f = flag_prefix
    train = LabelledSource(req.data, req.labels, f"{f}data", f"{f}labels", options, req.parquet_image_column)
    test = None
    if req.test_data:
        table = req.labels if req.labels and req.labels.endswith((".csv", ".parquet", ".pq")) else None
        test = LabelledSource(req.test_data, req.test_labels or table, f"{f}test-data", f"{f}test-labels", options,
                              req.parquet_image_column)
    return Sources(train, test)


def open_run_sources(section: EvalSection, seed: int, options: S3Options, image_column: str = "image") -> Sources:
    """A training run's ``eval.data`` opened and checked (errors name ``--eval-data`` ...), its
    ``protocol`` resolved in place (``auto``); EvalError for a protocol the labels cannot take."""
    req = run_request(section, seed, image_column)
    req.protocol = "knn" if section.protocol == "auto" else section.protocol
    sources = open_sources(req, options, flag_prefix="--eval-")
    found = resolve_protocol(sources)
    if section.protocol == "auto":
        section.protocol = found
    elif section.protocol != "multilabel-linear" and found != "knn":
        raise EvalError(f"eval.protocol: {section.protocol} needs one class per image, but {section.data} has images "
                        "with several; use multilabel-linear (or auto)")
    return sources


# ------------------------------------------------------------------ during a training run


def run_request(section: EvalSection, seed: int, image_column: str = "image") -> EvalRequest:
    """The request a training run's evaluation makes on ``eval.data`` (``protocol`` resolved
    first, ``resolve_protocol``): the same scoring as ``rayssl eval`` on the run's checkpoint."""
    return EvalRequest(data=section.data, labels=section.labels or None, protocol=section.protocol,
                       test_data=section.test_data or None, test_labels=section.test_labels or None,
                       test_fraction=section.test_fraction, k=section.knn_k, temperature=section.knn_temperature,
                       seed=seed, parquet_image_column=image_column)


def resolve_protocol(sources: Sources) -> str:
    """``eval.protocol=auto``: knn when every labelled image has one class, else multilabel-linear."""
    tables = [ls.labels for ls in (sources.train, sources.test) if ls is not None]
    single = all(len(classes) == 1 for labels in tables for classes in labels.values())
    return "knn" if single else "multilabel-linear"


def run_metric(section: EvalSection, method_metric: str) -> str:
    """The metric a run reports (and a sweep ranks by): its protocol's on ``eval.data``, else the
    method's own on the built-in scenes."""
    return METRIC[section.protocol] if section.data else method_metric


def evaluate(req: EvalRequest, ckpt: LoadedCheckpoint, sources: Sources, pool: ActorPool,
             extract: Extractor | None = None) -> dict:
    """Score ``ckpt``'s frozen backbone as ``req`` asks, its features extracted by ``pool``
    (a Ray Data batch-inference job on the connected Ray) or, for labelled sources, by
    ``extract`` (a training run's own evaluation: ``rayssl.runtime.evaluation``); returns the
    result dict."""
    size = req.image_size or ckpt.image_size
    state = backbone_state_dict(ckpt)
    info: dict = {"skipped": 0}
    batch = req.batch_size or feature_batch("cuda" if pool.use_gpu else "cpu")
    where = "in the run's rank-0 worker" if extract is not None else \
        f"{pool.actors} {'GPU' if pool.use_gpu else 'CPU'} actor(s), {batch} images a batch"
    features_of = extract
    if features_of is None:
        def features_of(ls: LabelledSource, st: dict, sz: int) -> FeatureTable:
            return source_features(ls.source, ls.ids_by_path, ckpt.backbone_name, ckpt.small_stem, st, size=sz,
                                   pool=pool, batch_size=batch, parquet_id_column=ls.parquet_id_column)

    def extract(st):
        if req.data == "scenes":
            t = scene_features(ckpt.backbone_name, ckpt.small_stem, st, seed=req.seed, n_train=req.num_train,
                               n_test=req.num_test, scene_size=ckpt.config["data"]["scenes_image_size"],
                               size=size, pool=pool, batch_size=batch)
            tr = t.columns["split"] == "eval-train"
            if req.protocol == "multilabel-linear":
                y = t.columns["labels"]
            else:
                y = t.columns["label"]
            info["classes"] = list(SHAPES)
            return t.features[tr], y[tr], t.features[~tr], y[~tr]
        ids, feats, label_sets, skipped = _features_for(sources.train, st, size, features_of)
        info["skipped"] = skipped
        test = None
        if sources.test is not None:
            _, f_te, sets_te, sk = _features_for(sources.test, st, size, features_of)
            info["skipped"] += sk
            test = (f_te, sets_te)
        f_tr, y_tr, f_te, y_te, info["classes"] = labelled_split(req.protocol, ids, feats, label_sets, test,
                                                                test_fraction=req.test_fraction, seed=req.seed)
        return f_tr, y_tr, f_te, y_te

    t0 = time.perf_counter()
    f_tr, y_tr, f_te, y_te = extract(state)
    extract_s = time.perf_counter() - t0
    log(f"features: {len(f_tr)} train + {len(f_te)} test images, dim {f_tr.shape[1]}, {extract_s:.1f}s "
        f"({(len(f_tr) + len(f_te)) / max(extract_s, 1e-9):.1f} img/s, {where})")
    metric = METRIC[req.protocol]
    result = {
        "checkpoint": ckpt.uri, "method": ckpt.method, "backbone": ckpt.backbone_name, "epoch": ckpt.epoch,
        "data": req.data, "protocol": req.protocol, "metric": metric,
        metric: round(score(req.protocol, f_tr, y_tr, f_te, y_te, req), 4),
        "num_train": int(len(f_tr)), "num_test": int(len(f_te)), "num_classes": len(info["classes"]),
        "image_size": size, "skipped_images": info["skipped"], "feature_s": round(extract_s, 1),
    }
    if req.protocol == "knn":
        result.update({"k": req.k, "temperature": req.temperature})
    if req.baseline:
        with cpu_seeded(req.seed):  # on rank 0 during training: its random streams go on untouched
            rand, _ = build_backbone(ckpt.backbone_name, small_stem=ckpt.small_stem)
        g_tr, z_tr, g_te, z_te = extract(rand.state_dict())
        result[f"{metric}_random_init"] = round(score(req.protocol, g_tr, z_tr, g_te, z_te, req), 4)
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
