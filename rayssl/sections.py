"""The shared sections of a run's configuration (run, data, model, optim, eval), their
checks, and how YAML and command-line values are read into them.

One dataclass per concern, validated in ``__post_init__``; a method's own section (SwAV's,
MLS's...) lives with the method and uses ``check`` and ``ConfigError`` from here. Every error
names the key the user typed (``swav.epsilon``, ``run.batch_size``...), so it can be fixed
without reading this file. ``rayssl.config.Config`` puts the sections together. Nothing here
imports Ray or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import yaml

from rayssl.storage import S3Options, endpoint_problem


class ConfigError(ValueError):
    """A configuration value a user gave is invalid; the message names the key."""


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class RunSection:
    """How the run is executed: where it writes, how long, on how many workers."""

    method: str = "swav"
    output: str = ""  # local dir or s3:// URI; empty -> ./runs/<method>-<timestamp>
    epochs: int = 100
    batch_size: int = 256  # global, split evenly over workers
    # with max_workers: the fewest the run trains with. 0: train in this process (Ray Train's
    # local mode: Ray Data feeds the step here; no worker actors, restarts, preemption or resizes)
    num_workers: int = 2
    # Elastic: Ray Train runs between num_workers and max_workers workers, as many as the cluster
    # can hold, and resizes (from the latest checkpoint) as nodes come and go. The global batch
    # stays batch_size: each worker's share is batch_size / workers. None: exactly num_workers.
    max_workers: int | None = None
    elastic_check_s: float = 60.0  # how often an elastic run looks for room for more workers
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float | None = None  # None: sized from the cluster's CPUs
    seed: int = 0
    resume: bool = False
    max_failures: int = 0
    # A local ``output`` is a shared filesystem mounted at the same path on every node;
    # without it a local output is refused on a multi-node cluster (checkpoints would scatter).
    shared_output: bool = False
    checkpoint_every_epochs: int = 1
    # Also checkpoint every N optimiser steps inside an epoch (None: only at epoch ends); a run
    # resumed from such a checkpoint continues from its step, the epoch's data position restored.
    checkpoint_every_steps: int | None = None
    # async: workers go on training while a checkpoint uploads (Ray Train's ASYNC upload); the
    # run's last checkpoint is always uploaded before the run ends. sync: wait for each upload.
    checkpoint_upload: str = "async"  # async | sync
    keep_checkpoints: int = 2
    # Spot preemption: every N steps the workers ask Ray Train together whether a node of theirs is
    # about to be reclaimed, and then write a just-in-time checkpoint (0: never ask).
    preemption_check_every_steps: int = 20
    max_preemptions: int = -1  # restarts after preemptions, apart from max_failures; -1: unlimited
    # Every N steps: a progress line, and a row (loss, lr, images/s) to metrics.jsonl and the trackers.
    log_every_steps: int = 10
    progress_bars: bool = False  # Ray Data's progress bars (--progress)
    # auto: bf16 on a GPU that has it, else fp16 (with a gradient scaler) on CUDA; on a CPU bf16
    # where it has bf16 matrix units (Intel AMX), else fp32.
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # channels_last memory for convolutions on GPUs and on CPUs in bf16. Not used on CPU in fp32:
    # measured here, torch's CPU fp32 channels_last backward of a ResNet-18 is off by 0.5%
    # (relative, vs float64) where the contiguous path is off by 7e-6.
    channels_last: bool = True
    # On CUDA, cuDNN times the algorithms for each new convolution shape and keeps the fastest
    # (a run's crop shapes are fixed, so it times them once); false: its heuristics' choice.
    cudnn_benchmark: bool = True

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "run.epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "run.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.num_workers >= 0, "run.num_workers",
              f"must be >= 1, or 0 to train in this process; got {self.num_workers}")
        check(not self.in_process or self.max_workers is None, "run.max_workers",
              "an in-process run (run.num_workers=0) has no workers to resize: it cannot be elastic "
              "(an elastic --num-workers MIN-MAX needs MIN >= 1)")
        check(self.elastic_check_s > 0, "run.elastic_check_s", f"must be > 0, got {self.elastic_check_s}")
        check(self.max_workers is None or self.max_workers >= self.num_workers, "run.max_workers",
              f"must be >= run.num_workers={self.num_workers}, got {self.max_workers}")
        uneven = [w for w in self.worker_counts if self.batch_size % w]
        check(
            not uneven,
            "run.batch_size",
            f"global batch {self.batch_size} is not divisible by num_workers {self.num_workers}"
            if not self.elastic else
            f"global batch {self.batch_size} is not divisible by {', '.join(map(str, uneven))} workers (the run "
            f"may train with any of {self.num_workers}-{self.max_workers}, and keeps its global batch)",
        )
        check(
            self.cpus_per_worker is None or self.cpus_per_worker > 0,
            "run.cpus_per_worker",
            f"must be > 0, got {self.cpus_per_worker}",
        )
        check(self.max_failures >= -1, "run.max_failures", "must be >= 0 (or -1 for unlimited)")
        check(not self.in_process or self.max_failures == 0, "run.max_failures",
              "an in-process run (run.num_workers=0) has no worker to restart; leave it 0, or train on workers")
        check(self.checkpoint_every_epochs >= 1, "run.checkpoint_every_epochs", "must be >= 1")
        check(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1, "run.checkpoint_every_steps",
              f"must be >= 1 (leave it unset for epoch checkpoints only), got {self.checkpoint_every_steps}")
        check(self.checkpoint_upload in ("async", "sync"), "run.checkpoint_upload",
              f"must be async or sync, got {self.checkpoint_upload!r}")
        check(self.preemption_check_every_steps >= 0, "run.preemption_check_every_steps",
              f"must be >= 0 (0: never ask), got {self.preemption_check_every_steps}")
        check(self.max_preemptions >= -1, "run.max_preemptions",
              f"must be >= 0, or -1 for unlimited; got {self.max_preemptions}")
        check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
        check(self.log_every_steps >= 1, "run.log_every_steps", "must be >= 1")
        check(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            "run.precision",
            f"must be one of auto, fp32, bf16, fp16; got {self.precision!r}",
        )

    @property
    def worker_counts(self) -> range:
        """Every number of workers the run may train with (an in-process run: its one)."""
        fewest = max(1, self.num_workers)
        return range(fewest, (self.max_workers or fewest) + 1)

    @property
    def in_process(self) -> bool:
        """``num_workers=0``: the run trains in the driver's process (Ray Train's local mode)."""
        return self.num_workers == 0

    @property
    def elastic(self) -> bool:
        return self.max_workers is not None and self.max_workers > self.num_workers

    @property
    def workers_text(self) -> str:
        return f"{self.num_workers}-{self.max_workers}" if self.elastic else str(self.num_workers)


@dataclass
class DataSection:
    """What is read and how each image becomes crops."""

    source: str = "scenes"  # "scenes" (built-in) or a local folder / URI of images
    scenes_num_images: int = 2048
    scenes_image_size: int = 64
    # Images in tar or Parquet shards, where the user knows it (the shard writer's stats): sizes the
    # epoch and schedule without reading every shard to count them (0: manifest.json, else counted).
    shard_images: int = 0
    # Multi-crop: one entry per crop group (SwAV: 2 x 224 at (0.14, 1) + 6 x 96 at (0.05, 0.14)).
    crop_sizes: list[int] = field(default_factory=lambda: [224, 96])
    crop_counts: list[int] = field(default_factory=lambda: [2, 6])
    min_scale: list[float] = field(default_factory=lambda: [0.14, 0.05])
    max_scale: list[float] = field(default_factory=lambda: [1.0, 0.14])
    shuffle_buffer: int = 1024  # rows held by each worker's local shuffle (none on the scenes: see crop_scenes)
    read_batch_size: int = 32  # rows per Ray Data augmentation task batch
    # Per-crop photometric augmentation (SwAV: jitter 0.8 with p 0.8, grayscale 0.2, blur 0.5).
    color_jitter: float = 0.8
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    # S3 / S3-compatible stores. Credentials always come from the AWS chain (env vars,
    # profile, instance role) and are never stored here. An empty endpoint means AWS; the
    # command fills it from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL where it starts, so every
    # process of the run reaches the same store (rayssl.storage).
    s3_endpoint: str = ""
    s3_anonymous: bool = False  # unsigned requests, for public buckets (the dataset only)
    # One request's connect/read timeout (a stalled read is cut, then retried) and the S3
    # client's retries on throttling, server errors, dropped connections and timeouts.
    s3_timeout_s: float = 30.0
    s3_max_retries: int = 4
    parquet_image_column: str = "image"  # binary column (or struct with "bytes") of Parquet shards
    # Images whose shorter side is below this are skipped as too_small; 0 = the largest
    # crop size (a smaller image could only be upsampled into its crops).
    min_image_side: int = 0
    # Stop with an error when more than this fraction of the images seen is unusable
    # (checked once 64 images were seen); 1.0 never stops.
    max_bad_fraction: float = 0.5
    labels: str = ""  # evaluation labels: CSV/Parquet table (id -> classes) or ImageFolder root
    # Same seed -> the same rows reach the same worker in the same order every run (Ray Data
    # preserve_order, seeded file order every epoch): a resumed run then matches an
    # uninterrupted one. Slower; off by default (augmentations are seeded either way).
    deterministic: bool = False
    # Where the multi-crop runs: "cpu" in the Ray Data tasks (crops are shipped), or
    # "device" in the training worker (Ray Data ships the encoded bytes; the worker decodes,
    # with nvJPEG on CUDA, and augments batched on its device: rayssl.data.gpu_augment).
    augment_on: str = "cpu"

    def __post_init__(self) -> None:
        check(bool(self.source), "data.source", "must not be empty")
        check(self.augment_on in ("cpu", "device"), "data.augment_on",
               f"must be cpu or device, got {self.augment_on!r}")
        check(self.scenes_num_images >= 1, "data.scenes_num_images", "must be >= 1")
        check(self.shard_images >= 0 and not (self.shard_images and self.builtin_scenes), "data.shard_images",
              "must be >= 0 (0: count), and is for shards (the built-in scenes number data.scenes_num_images)")
        check(self.scenes_image_size >= 8, "data.scenes_image_size", "must be >= 8")
        n = len(self.crop_sizes)
        for key in ("crop_counts", "min_scale", "max_scale"):
            check(len(getattr(self, key)) == n, f"data.{key}",
                  f"needs one entry per crop group ({n}, as data.crop_sizes), got {getattr(self, key)}")
        check(n >= 1, "data.crop_sizes", "needs at least one crop group")
        check(all(s > 0 for s in self.crop_sizes), "data.crop_sizes", "sizes must be > 0")
        check(all(c >= 1 for c in self.crop_counts), "data.crop_counts", "counts must be >= 1")
        check(self.crop_counts[0] >= 2, "data.crop_counts",
              "the first (large) group needs >= 2 crops: SwAV and MLS compare two views")
        for lo, hi in zip(self.min_scale, self.max_scale):
            check(0 < lo <= hi <= 1, "data.min_scale", f"need 0 < min_scale <= max_scale <= 1, got ({lo}, {hi})")
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        check(self.read_batch_size >= 1, "data.read_batch_size", "must be >= 1")
        check(0 <= self.color_jitter <= 2, "data.color_jitter", "must be in [0, 2]")
        for key in ("color_jitter_p", "grayscale_p", "blur_p"):
            check(0 <= getattr(self, key) <= 1, f"data.{key}", "must be a probability in [0, 1]")
        problem = endpoint_problem(self.s3_endpoint)
        check(problem is None, "data.s3_endpoint", problem or "")
        check(self.s3_timeout_s > 0, "data.s3_timeout_s", f"must be > 0, got {self.s3_timeout_s}")
        check(self.s3_max_retries >= 0, "data.s3_max_retries", f"must be >= 0 (retries), got {self.s3_max_retries}")
        check(bool(self.parquet_image_column), "data.parquet_image_column", "must not be empty")
        check(self.min_image_side >= 0, "data.min_image_side", "must be >= 0 (0: the largest crop size)")
        check(0 < self.max_bad_fraction <= 1, "data.max_bad_fraction",
               f"must be in (0, 1], got {self.max_bad_fraction}")

    @property
    def builtin_scenes(self) -> bool:
        return self.source == "scenes"

    @property
    def s3(self) -> S3Options:
        """How to reach the dataset's store (endpoint, anonymous reads, timeout, retries); the
        run's own files (outputs, checkpoints, label tables) use ``s3.signed()``."""
        return S3Options(endpoint=self.s3_endpoint, anonymous=self.s3_anonymous, timeout_s=self.s3_timeout_s,
                         max_retries=self.s3_max_retries)


@dataclass
class ModelSection:
    """The backbone and its options."""

    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | timm:<any timm model name>
    small_stem: bool = False  # 3x3 stride-1 stem without max-pool, for 32-96 px inputs (torchvision ResNets)
    sync_batchnorm: bool = False
    compile: bool = False  # torch.compile the backbone (GPU runs)
    compile_backend: str = "inductor"  # torch.compile's backend (e.g. cudagraphs; eager: tracing alone)
    # Starting weights of the backbone (rayssl.modules.pretrained): a file (local or s3://)
    # holding a torchvision or timm state dict, a rayssl export, a rayssl checkpoint or run
    # directory; or "torchvision" / "timm" (/":<tag>") for weights already in the local cache.
    pretrained: str = ""

    def __post_init__(self) -> None:
        from rayssl.modules.backbone import backbone_problem  # imports timm for timm: names only

        problem = backbone_problem(self.backbone, self.small_stem)
        check(problem is None, "model.small_stem" if problem and "small_stem" in problem else "model.backbone",
              problem or "")


@dataclass
class OptimSection:
    """Optimiser and learning-rate schedule."""

    # lars | sgd | adamw. AdamW (decoupled weight decay; momentum unused) is not in the
    # papers; at the quick preset's 256 steps it is what lets *labels* learn the scenes
    # (experiments/supervised_reference.py; figures in docs/results/swav-on-scenes.md).
    optimizer: str = "lars"
    base_lr: float = 0.3  # per 256 images; scaled linearly with the global batch (all optimisers)
    final_lr_ratio: float = 0.001  # final lr = base lr x ratio (SwAV: 0.0048 / 4.8)
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars_eta: float = 0.001  # LARS trust coefficient (SwAV: 0.001)
    # SwAV wraps every parameter in LARC; excluding biases/norms (solo-learn's choice) lets
    # them move at the raw learning rate, which collapses the projector at SwAV's lr.
    lars_exclude_bias_norm: bool = False
    clip_grad_norm: float = 0.0  # > 0: clip the global gradient norm to this before each step

    def __post_init__(self) -> None:
        check(self.optimizer in ("lars", "sgd", "adamw"), "optim.optimizer",
               f"must be lars, sgd or adamw, got {self.optimizer!r}")
        check(self.base_lr > 0, "optim.base_lr", f"must be > 0, got {self.base_lr}")
        check(0 <= self.final_lr_ratio <= 1, "optim.final_lr_ratio", "must be in [0, 1]")
        check(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        check(self.lars_eta > 0, "optim.lars_eta", "must be > 0")
        check(self.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be >= 0 (0: no clipping)")


@dataclass
class EvalSection:
    """Evaluation during the run: on the user's labelled images (``data``), else on held-out
    labelled scenes when training on the built-in scenes, else none."""

    knn_k: int = 20
    knn_temperature: float = 0.07
    num_train_images: int = 1000  # labelled scenes forming the kNN memory bank
    num_test_images: int = 500  # held-out labelled scenes that are classified
    every_epochs: int = 0  # 0: only at the end
    random_baseline: bool = True  # also evaluate a randomly initialised backbone
    # Labelled images of the user's, in the forms `rayssl eval` reads: an ImageFolder folder /
    # prefix, or images / .tar / Parquet shards with a labels table (id -> classes joined by |).
    data: str = ""
    labels: str = ""  # default: the class folders of data
    test_data: str = ""  # held-out images; default: a seeded test_fraction of data
    test_labels: str = ""
    test_fraction: float = 0.2
    protocol: str = "auto"  # auto: knn for one class per image, else multilabel-linear | knn | linear
    # A linear head trained beside pretraining on the labelled training split (one batch after each
    # step, on rank 0; the backbone's update is unchanged), scored on the held-out split every epoch.
    online_probe: bool = False
    online_probe_batch: int = 32
    online_probe_lr: float = 1e-3
    # Where eval.data's evaluation runs: "beside" training in a Ray task (rank 0 hands it the epoch's
    # weights and goes on; the score joins a later report against its epoch), on "rank0" between
    # epochs, or "auto": beside when training on GPUs (their node's CPUs are free), else on rank 0.
    where: str = "auto"
    background_cpus: float = 0.0  # CPUs the task reserves (0: none taken from training); its threads

    def __post_init__(self) -> None:
        check(self.protocol in ("auto", "knn", "linear", "multilabel-linear"), "eval.protocol",
              f"choose auto, knn, linear or multilabel-linear, got {self.protocol!r}")
        check(0 < self.test_fraction < 1, "eval.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        for key in ("labels", "test_data", "test_labels"):
            check(not getattr(self, key) or bool(self.data), f"eval.{key}", "needs eval.data (--eval-data)")
        check(self.knn_k >= 1, "eval.knn_k", "must be >= 1")
        check(self.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
        check(self.num_train_images >= 1, "eval.num_train_images", "must be >= 1")
        check(self.num_test_images >= 0, "eval.num_test_images", "must be >= 0 (0 disables evaluation)")
        check(self.every_epochs >= 0, "eval.every_epochs", "must be >= 0")
        check(self.online_probe_batch >= 1, "eval.online_probe_batch", "must be >= 1")
        check(self.online_probe_lr > 0, "eval.online_probe_lr", "must be > 0")
        check(self.where in ("auto", "beside", "rank0"), "eval.where",
              f"choose auto, beside or rank0, got {self.where!r}")
        check(self.background_cpus >= 0, "eval.background_cpus", "must be >= 0")
        check(
            self.knn_k <= self.num_train_images,
            "eval.knn_k",
            f"k={self.knn_k} exceeds the {self.num_train_images} memory-bank images",
        )


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "model": ModelSection,
    "optim": OptimSection,
    "eval": EvalSection,
}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Coerce YAML/CLI scalars to the annotated type, or raise naming the key."""
    text = str(typ)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{key}: must not be null")
    try:
        if text.startswith("list[int]"):
            vals = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return [int(v) for v in vals]
        if text.startswith("list[float]"):
            vals = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return [float(v) for v in vals]
        if typ is bool or text.startswith("bool"):
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            if "None" in text and s in ("auto", "none", "null"):
                return None
            raise ValueError(s)
        if typ is int or text.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float or text.startswith("float"):
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {text}") from None
    return value


def build_section(cls: type, raw: Mapping[str, Any], prefix: str):
    """Build one section dataclass from a mapping, rejecting unknown keys by name."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
            f"valid keys in {prefix}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(f"{prefix}: {exc}") from None


def deep_merge(base: dict, override: Mapping[str, Any]) -> dict:
    """Merge nested mappings; values of ``override`` win."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path, option: str = "--config") -> dict:
    """Read a YAML file of sections; errors name ``option`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{option}: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{option}: {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{option}: {p} must hold a mapping of sections (run:, data:, ...)")
    return data


def parse_assignment(text: str) -> dict:
    """``section.key=value`` -> nested dict (value parsed as YAML scalar/list)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set: expected section.key=value, got {text!r}")
    dotted, value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return {section: {key: parsed}}
