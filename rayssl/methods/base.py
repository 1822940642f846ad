"""What every method is, and the registry that names them.

A method is one file in ``rayssl/methods/``: a config dataclass (the paper's defaults,
validated; a subclass of :class:`MethodConfig`) and an ``nn.Module`` subclass of
:class:`Method` whose ``forward(crops, epoch=, step=, **columns)`` is one training step's
computation up to the loss. The class is registered with :func:`register`, which carries
everything the rest of the system needs to know about the method: its config section, the
metric it is evaluated by, how it changes the presets, its default search space and what its
default run on the built-in scenes can be expected to show. Adding a method touches that one
file (and the import in ``rayssl/methods/__init__.py``).

The training loop, the benchmark and the pictures call the hooks below unconditionally; the
base class makes each a no-op, so a method overrides only what it has. Pure PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn

from rayssl.sections import DataSection, EvalSection, RunSection

__all__ = ["Method", "MethodConfig", "MethodSpec", "get_method", "group_same_size", "method_names", "register"]


@dataclass
class MethodConfig:
    """Base of a method's config section (the YAML section named after the method)."""

    section: ClassVar[str] = ""  # the YAML section / CLI method name, used in error messages
    # Keys naming local files or folders that the training workers open themselves: the CLI
    # makes them absolute, since Ray's workers do not run in the shell's directory.
    path_keys: ClassVar[tuple[str, ...]] = ()

    def validate_with(self, run: RunSection, data: DataSection) -> None:
        """Checks that need the other sections (workers, batch, crops); raises ConfigError."""

    def fit_batch(self, batch_size: int, workers: int) -> dict:
        """Changes (``{key: value}``) that make this section valid for a global ``batch_size``
        split over ``workers`` (queues sized in whole batches...): the benchmark measures the
        method at batch sizes and worker counts of its own."""
        return {}

    def warmup_steps(self, batch_size: int) -> int:
        """Steps at ``batch_size`` before every part of the step runs (a queue filled...)."""
        return 0

    def indexed_data(self) -> str:
        """URI of a table that lists the training images by index, for a method that keeps
        state per image (the data pipeline then delivers each image's ``index``); "" = none."""
        return ""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its module class, config section and what the system needs of it."""

    name: str
    model_cls: type
    config_cls: type
    metric: str  # the evaluation metric reported for this method (higher is better)
    summary: str
    # Preset name -> the sections this method changes on top of ``rayssl.presets.PRESETS``.
    presets: Mapping[str, dict] = field(default_factory=dict)
    # The default search space of a sweep: "section.key" -> rayssl.space.Dim (or a fixed value).
    space: Mapping[str, Any] = field(default_factory=dict)
    # Said on stderr when the default run on the built-in scenes ends at or below its
    # random-init backbone: what that means for this method at that budget.
    scenes_note: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, config: type, metric: str, summary: str, presets: Mapping[str, dict] | None = None,
             space: Mapping[str, Any] | None = None, scenes_note: str = "") -> Callable[[type], type]:
    """Class decorator: register the decorated :class:`Method` under ``name``."""

    def add(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        if config.section != name:
            raise ValueError(f"{config.__name__}.section is {config.section!r}, not {name!r}")
        _REGISTRY[name] = MethodSpec(name, cls, config, metric, summary, dict(presets or {}), dict(space or {}),
                                     scenes_note)
        return cls

    return add


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def group_same_size(crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate consecutive crops of equal resolution so each size is one backbone call."""
    groups: list[list[torch.Tensor]] = []
    for c in crops:
        if groups and groups[-1][0].shape[-2:] == c.shape[-2:]:
            groups[-1].append(c)
        else:
            groups.append([c])
    return [torch.cat(g) if len(g) > 1 else g[0] for g in groups]


class Method(nn.Module):
    """Base of every method module. Subclasses define ``backbone`` and ``forward``.

    Constructed as ``cls(section, model, num_crops=, world_size=, options=)``: the method's
    config section, the model section, the crops per image, the number of workers and the
    run's storage options (``rayssl.storage.S3Options``, for a method that reads files itself).

    ``forward(crops, epoch=0, step=0, **columns) -> (loss, metrics)``: ``crops`` are the
    multi-crop views (each (B, 3, h, w)), ``columns`` the extra batch columns named in
    ``batch_columns``; ``metrics`` are detached scalars and hold at least ``"loss"``.
    """

    # Extra columns of each batch the method needs besides the crops (CDUL: "index").
    batch_columns: ClassVar[tuple[str, ...]] = ()
    # Whether the end-of-run evaluation also scores a randomly initialised backbone.
    random_init_baseline: ClassVar[bool] = True
    # Whether every rank holds the same rank state (a global queue, kept in step on every
    # worker): after a change of worker count each rank restores rank 0's copy. Otherwise rank
    # state is each worker's share (SwAV's per-worker queues) and starts empty after one.
    replicated_rank_state: ClassVar[bool] = False

    def after_backward(self, step: int) -> None:
        """Called between ``loss.backward()`` and the optimiser step (e.g. to drop a gradient)."""

    def example_columns(self, batch_size: int, generator: torch.Generator) -> dict:
        """A batch's ``batch_columns`` as the worker's feed hands them over (on the host), for the
        benchmark's synthetic batches; {} for a method that names none."""
        return {}

    def backbone_loaded(self) -> None:
        """Called after starting weights were loaded into ``backbone`` (``model.pretrained``):
        a copy of it (a momentum encoder) takes them too."""

    def collapse_classes(self) -> int | None:
        """K when a collapsed model's loss sits at ln K (SwAV's uniform predictions); else None."""
        return None

    def progress_text(self, metrics: Mapping[str, torch.Tensor]) -> str:
        """Extra text for a progress line, from a step's metrics (reads them on the host)."""
        return ""

    def loss_includes(self) -> str:
        """What ``forward`` computes beyond backbone and heads (the benchmark's "loss" share)."""
        return "the method's forward beyond backbone and heads"

    # -- state ------------------------------------------------------------------------------
    def rank_state_dict(self) -> dict:
        """State that differs per worker (a per-worker queue); checkpointed per rank."""
        return {}

    def load_rank_state_dict(self, state: dict) -> bool:
        """Restore :meth:`rank_state_dict`; False when it does not fit (e.g. the workers changed)."""
        return True

    def shared_state_dict(self) -> dict:
        """State outside the module's parameters that every rank holds identically (saved once)."""
        return {}

    def load_shared_state_dict(self, state: dict) -> None:
        """Restore :meth:`shared_state_dict`."""

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, metric: str, sets: tuple[dict, dict], size: int, device, eval_cfg: EvalSection) -> float:
        """The method's metric on held-out labelled scenes (train, test): by default the frozen
        backbone's features scored by kNN top-1 or a linear probe's mAP."""
        from rayssl.eval.features import evaluate_on_scenes

        return evaluate_on_scenes(metric, self.backbone, sets, size, device, eval_cfg.knn_k, eval_cfg.knn_temperature)

    # -- the benchmark's split of a step --------------------------------------------------------
    def backbone_inputs(self, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The batches the trainable backbone sees in one step (by default every crop, same sizes together)."""
        return group_same_size(crops)

    def heads_output(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone and heads for one step's crops, without the loss (for the benchmark's split)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its step for the benchmark")

    def extra_timings(self, batch_size: int, device) -> dict[str, Callable[[], object]]:
        """Named parts of the step worth timing alone (``{"sinkhorn_ms": fn}``)."""
        return {}
