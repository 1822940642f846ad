"""One worker's training state and THE training step (pure PyTorch).

``Engine`` builds what a run trains -- the method module (``rayssl.methods``) with its starting
weights (``model.pretrained``), its optimiser and learning-rate schedule, the precision -- and
``Engine.train_step`` runs one step: schedule, forward under autocast (loss checked for
finiteness), backward (through a gradient scaler in fp16), the method's after-backward hook,
optional gradient clipping, optimiser step. The Ray Train worker (``rayssl.runtime.worker``), the benchmark
(``rayssl.bench``) and the experiments all call this one function, so what they measure is
what training runs. With several workers the caller's process group exists and the engine
wraps the method in DistributedDataParallel; without one it runs in-process.

The engine also writes and restores the checkpoint state (``rayssl.checkpoint``'s format): the
shared part from rank 0, each rank's own part (per-worker queues, RNG states).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Mapping, Sequence

import torch

from rayssl.checkpoint import (
    CheckpointError,
    gather_rank_sizes,
    load_rank_state,
    load_shared_state,
    rng_state,
    set_rng_state,
    write_rank_state,
    write_shared_state,
)
from rayssl.config import Config
from rayssl.methods import Method, get_method
from rayssl.modules.backbone import build_backbone, sync_batchnorm
from rayssl.modules.precision import bf16_unsafe_convs, resolve_precision
from rayssl.modules.pretrained import load_into, read_weights
from rayssl.optim import Schedule, build_optimizer

__all__ = ["Engine", "autocast_for", "build_method", "checked_forward", "new_method", "resolve_precision",
           "set_cudnn_benchmark", "training_precision", "uses_channels_last"]


def training_precision(cfg: Config, device: torch.device, backbone: torch.nn.Module | None = None) -> str:
    """The precision a run trains in on ``device``: ``resolve_precision`` of ``run.precision``,
    except that ``auto`` on a CPU stays fp32 where bf16's convolution gradients would be wrong for
    this backbone at the run's smallest crop (``bf16_unsafe_convs``). ``backbone``: the run's own
    (else one is built, on the CPU, only when that question arises)."""
    resolved = resolve_precision(cfg.run.precision, device)
    if not (cfg.run.precision == "auto" and device.type == "cpu" and resolved == "bf16"):
        return resolved
    if backbone is None:
        backbone, _ = build_backbone(cfg.model.backbone, small_stem=cfg.model.small_stem)
    return "fp32" if bf16_unsafe_convs(backbone, min(cfg.data.crop_sizes)) else "bf16"


def uses_channels_last(cfg: Config, device: torch.device, precision: str) -> bool:
    """channels_last memory for convolutions (see ``run.channels_last``): on CUDA, and on a CPU
    training in bf16, where oneDNN's bf16 convolutions run fastest on NHWC tensors.
    ``precision``: the run's ``training_precision``."""
    return cfg.run.channels_last and (device.type == "cuda" or precision == "bf16")


def set_cudnn_benchmark(cfg: Config, device: torch.device) -> None:
    """``run.cudnn_benchmark`` on a CUDA device (the switch is the process's; untouched elsewhere)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark


def new_method(cfg: Config, world_size: int = 1) -> Method:
    """The run's method module as constructed, on the host, initialised from ``run.seed`` (the same
    on every rank); ``build_method`` then loads, places and compiles it."""
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (DDP also broadcasts)
    # options: the run's store, for what a method reads itself (CDUL's label table)
    return get_method(cfg.run.method).model_cls(cfg.method, cfg.model, num_crops=sum(cfg.data.crop_counts),
                                                world_size=world_size, options=cfg.data.s3.signed())


def build_method(cfg: Config, device: torch.device, world_size: int = 1) -> tuple[Method, str]:
    """The run's method module on ``device``, initialised from ``run.seed`` (the same on every rank),
    and the precision it trains in (``training_precision``, decided once, on this backbone)."""
    method = new_method(cfg, world_size)
    if cfg.model.pretrained:
        state, _ = read_weights(cfg.model.pretrained, cfg.model.backbone, cfg.data.s3.signed())
        load_into(method.backbone, state, cfg.model.backbone, cfg.model.pretrained)
        method.backbone_loaded()
    if cfg.model.sync_batchnorm and world_size > 1:
        method = sync_batchnorm(method)  # GPU workers only (the driver refuses it on CPUs)
    method.to(device)
    set_cudnn_benchmark(cfg, device)
    precision = training_precision(cfg, device, method.backbone)
    if uses_channels_last(cfg, device, precision):
        method.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        # In place (Module.compile): parameter names, checkpoints and exports stay unchanged.
        method.backbone.compile(backend=cfg.model.compile_backend)
    return method, precision


def autocast_for(precision: str, device: torch.device) -> tuple[Callable[[], ContextManager], str]:
    """(context factory, name) for ``run.precision`` on ``device``. Sinkhorn and the losses'
    exp/log run in float32 whatever the autocast (the methods cast to float)."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return nullcontext, "fp32"
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), f"{resolved} autocast"


def checked_forward(model, crops, *, epoch: int, step: int, method_name: str, autocast=nullcontext,
                    check_loss: bool = True, columns: Mapping | None = None):
    """One forward pass -> ``(loss, metrics)``; a non-finite quantity stops the step.

    Non-finite Sinkhorn codes (the methods raise ValueError "... not finite ...") and, when
    ``check_loss``, a non-finite loss become FloatingPointError naming the step, the epoch
    and the quantity. ``columns``: the batch columns the method names in ``batch_columns``.
    """
    try:
        with autocast():
            loss, metrics = model(crops, epoch=epoch, step=step, **(columns or {}))
    except ValueError as exc:
        if "not finite" not in str(exc):
            raise
        raise FloatingPointError(f"step {step} (epoch {epoch}): {exc}") from None
    if check_loss and not torch.isfinite(loss).item():
        raise FloatingPointError(
            f"step {step} (epoch {epoch}): the {method_name} loss is not finite ({loss.item()}); "
            "lower optim.base_lr or check the input data"
        )
    return loss, metrics


class Engine:
    """One worker's method, optimiser, schedule and counters.

    Args:
        cfg: the run's resolved config.
        steps_per_epoch: steps of one epoch at the global batch (sizes the schedule).
        device: where this worker trains.
        world_size, rank: this worker's place among the ranks of the caller's process group.

    After construction call :meth:`restore` (a checkpoint to continue from) and then
    :meth:`start` (per-rank randomness, DDP); then :meth:`train_step` once per batch, with
    ``epoch`` set to the epoch being trained.
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, device: torch.device | str = "cpu",
                 world_size: int = 1, rank: int = 0):
        self.cfg, self.device = cfg, torch.device(device)
        self.world_size, self.rank = world_size, rank
        self.steps_per_epoch = steps_per_epoch
        self.method, precision = build_method(cfg, self.device, world_size)
        self.model: torch.nn.Module = self.method  # DDP-wrapped by start() with several workers
        self.optimizer = build_optimizer(self.method, cfg.optim)
        self.schedule = Schedule(cfg.optim, cfg.run.batch_size, cfg.run.epochs, steps_per_epoch)
        self.autocast, self.precision = autocast_for(precision, self.device)
        # fp16's narrow range: the loss is scaled up for backward and the gradients unscaled
        # before clipping and the step; a step whose gradients overflowed is skipped.
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.channels_last = uses_channels_last(cfg, self.device, precision)
        self.epoch = 0  # the epoch being trained (0-based); after restore(): the next one
        self.step = 0  # optimiser steps taken in the whole run
        self.epoch_step = 0  # steps taken in the epoch being trained (a mid-epoch checkpoint resumes here)
        self.images_seen = 0
        self.rng_restored = False  # this rank's random streams came from a checkpoint

    # -- starting ---------------------------------------------------------------------------
    def restore(self, directory: str) -> str:
        """Continue from the checkpoint in ``directory``; returns a line saying from where.

        Read onto the host whatever the device: the RNG states must be CPU tensors, CDUL's label
        store lives on the host, and ``load_state_dict`` copies the rest onto the device."""
        try:
            shared = load_shared_state(directory, map_location="cpu")
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume: {exc}") from None
        self.method.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        if self.scaler is not None and "scaler" in shared:
            self.scaler.load_state_dict(shared["scaler"])
        self.epoch, self.step, self.images_seen = shared["epoch"], shared["step"], shared["images_seen"]
        self.epoch_step = shared.get("epoch_step", 0)
        resized = shared.get("world_size") != self.world_size
        if not resized:
            mine = load_rank_state(directory, self.rank, map_location="cpu")
        elif self.method.replicated_rank_state:  # every rank held the same copy: take rank 0's
            mine = load_rank_state(directory, 0, map_location="cpu")
        else:  # a worker's share of the state does not carry over to another worker count
            mine = None
        kept = mine is not None and self.method.load_rank_state_dict(mine["method"])
        if "method_state" in shared:  # state shared by all ranks (CDUL's label store)
            self.method.load_shared_state_dict(shared["method_state"])
        if mine is not None and not resized:
            set_rng_state(mine["rng"])
            self.rng_restored = True
        n = self.epoch_step
        within = f" ({n} step{'' if n == 1 else 's'} into epoch {self.epoch + 1})" if n else ""
        empty = not kept and bool(self.method.rank_state_dict())
        return (f"resumed from checkpoint at epoch {self.epoch}, step {self.step}{within}"
                + (" (per-worker state such as queues restarted empty)" if empty else ""))

    def start(self) -> None:
        """Per-rank randomness from here on (``seed_streams``), and DDP with several workers."""
        self.seed_streams()
        if self.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.method, device_ids=[self.device] if self.device.type == "cuda" else None)

    def seed_streams(self) -> None:
        """A rank whose random streams were not in the checkpoint (a fresh run, or one resumed on
        another number of workers) is seeded by its rank and the step it starts at: ranks never
        share a stream, and a resized run does not replay the randomness of the run's first steps."""
        if not self.rng_restored:
            torch.manual_seed(self.cfg.run.seed * 1000 + self.rank + 1 + 1_000_003 * self.step)

    # -- the step ---------------------------------------------------------------------------
    def train_step(self, crops: Sequence[torch.Tensor], columns: Mapping | None = None, *,
                   check_loss: bool | None = None) -> dict:
        """One optimiser step on this worker's share of a batch; returns the step's metrics
        (detached scalars, ``"loss"`` among them) and its ``"lr"``.

        ``check_loss`` (default: every step on CPU; on a GPU only at log steps, to avoid a
        device sync per step): stop with FloatingPointError on a non-finite loss.
        """
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if check_loss is None:
            check_loss = self.device.type == "cpu" or self.step % self.cfg.run.log_every_steps == 0
        loss, metrics = checked_forward(self.model, crops, epoch=self.epoch, step=self.step,
                                        method_name=self.cfg.run.method, autocast=self.autocast,
                                        check_loss=check_loss, columns=columns)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
        self.method.after_backward(self.step)
        clip = self.cfg.optim.clip_grad_norm
        if self.scaler is None:
            if clip:
                torch.nn.utils.clip_grad_norm_(self.method.parameters(), clip)
            self.optimizer.step()
        else:
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.method.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step += 1
        self.epoch_step += 1
        self.images_seen += self.cfg.run.batch_size
        return {**metrics, "lr": lr}

    # -- checkpoints ------------------------------------------------------------------------
    def shared_state(self, mid_epoch: bool = False, reason: str = "epoch") -> dict:
        """What every rank shares: weights, optimiser, counters (epochs completed, and with
        ``mid_epoch`` the steps taken in the epoch under way), config, and why it was written
        (``reason``: epoch | steps | preemption)."""
        state = {"method": self.cfg.run.method, "model": self.method.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch + (0 if mid_epoch else 1),
                 "epoch_step": self.epoch_step if mid_epoch else 0, "step": self.step, "reason": reason,
                 "images_seen": self.images_seen, "world_size": self.world_size, "config": self.cfg.to_dict()}
        method_state = self.method.shared_state_dict()
        if method_state:
            state["method_state"] = method_state
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def write_checkpoint(self, directory: str, mid_epoch: bool = False, reason: str = "epoch") -> None:
        """Collective: every rank writes its own file; rank 0 the shared state and, last, the manifest.
        ``mid_epoch``: a checkpoint inside the epoch being trained (see :meth:`shared_state`)."""
        size = write_rank_state(directory, self.rank, {"method": self.method.rank_state_dict(), "rng": rng_state()})
        sizes = gather_rank_sizes(size, self.device)  # the manifest records every rank's file
        if self.rank == 0:
            write_shared_state(directory, self.shared_state(mid_epoch, reason), world_size=self.world_size, rank_sizes=sizes)
