"""The training step alone, timed: ``Engine.train_step`` on synthetic crops already on the device.

The step measured is the one the Ray worker runs (``rayssl.engine.Engine.train_step``): forward
+ loss (Sinkhorn, queues) + backward + optimiser. Its time is then split into backbone, heads,
loss (what the method's forward adds beyond backbone and heads) and optimiser, each the median
over steps, by running the step's stages separately (backbone fwd+bwd; + heads; full fwd+bwd;
optimiser). No Ray.

Beside it, the baseline a user would write instead: the same method, crops and optimiser in a
plain PyTorch loop (``plain_step``: autocast forward, zero_grad, backward, optimiser step; no
schedule, no loss check, no scaler or clipping), timed in alternation with the engine's step so
that a slow moment of the machine falls on both. ``step_over_plain`` near 1 says the engine adds
nothing measurable to the step.

On CUDA the step's waits for the device are counted too (``syncs_per_step``: CUDA's sync debug
mode): a step that waits cannot be queued ahead of the GPU. A method's extra batch columns
(CDUL's image index) come from ``Method.example_columns``, on the host as the worker's feed
hands them over.
"""

from __future__ import annotations

import resource
import statistics
import time
import warnings
from typing import Callable, Sequence

import torch

from rayssl.config import Config
from rayssl.engine import Engine, checked_forward

__all__ = ["StepBench", "count_syncs", "error_line", "measure_step", "peak_memory", "timed"]

# Past the queue's start epoch and the prototype freeze: every part of the step runs.
FAR = 10**6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_line(exc: BaseException) -> str:
    """An exception as one line for a benchmark's JSON: its type and its message's last line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, the device synchronised before and after."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """How many times ``fn`` made the host wait for the device: CUDA's sync debug mode warns at
    every call that synchronises (a ``.item()``, a copy to pageable memory, a data-dependent
    shape...). None off CUDA, where nothing runs ahead of the host."""
    if device.type != "cuda":
        return None
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


class StepBench:
    """One worker's ``Engine`` on ``device`` (no Ray, no DDP) and a batch of synthetic crops."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.engine = Engine(cfg, steps_per_epoch=1, device=device)
        self.engine.start()
        self.engine.epoch, self.engine.step = FAR, FAR
        self.method, self.optimizer = self.engine.method, self.engine.optimizer
        b = cfg.run.batch_size
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.crops = [self._layout(torch.randn(b, 3, s, s, generator=gen).to(device))
                      for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts) for _ in range(c)]
        self.columns = self.method.example_columns(b, gen)  # on the host, as the feed hands them over

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.engine.channels_last else x

    def step(self, crops: Sequence[torch.Tensor] | None = None, columns: dict | None = None) -> dict:
        """The training step (the worker's), with the loss unchecked as on a GPU between log steps."""
        return self.engine.train_step(crops if crops is not None else self.crops,
                                      self.columns if columns is None else columns, check_loss=False)

    def plain_step(self) -> None:
        """The same step as a hand-written loop would take it (the baseline; no engine)."""
        with self.engine.autocast():
            loss, _ = self.method(self.crops, epoch=FAR, step=FAR, **self.columns)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.method.after_backward(FAR)
        self.optimizer.step()

    # -- the split ------------------------------------------------------------------------
    def _backbone_stage(self) -> None:
        with self.engine.autocast():
            out = sum(self.method.backbone(x).float().sum() for x in self.method.backbone_inputs(self.crops))
        out.backward()

    def _heads_stage(self) -> None:
        with self.engine.autocast():
            out = self.method.heads_output(self.crops).float().sum()
        out.backward()

    def _full_stage(self) -> None:
        loss, _ = checked_forward(self.method, self.crops, epoch=FAR, step=FAR, method_name=self.cfg.run.method,
                                  autocast=self.engine.autocast, check_loss=False, columns=self.columns)
        loss.backward()

    def split(self, steps: int) -> dict:
        """Median ms per step of each share (stages timed separately, differences taken)."""
        opt = self.optimizer
        times: dict[str, list[float]] = {"bb": [], "bh": [], "fb": [], "opt": []}
        for _ in range(steps):
            for key, fn in (("bb", self._backbone_stage), ("bh", self._heads_stage), ("fb", self._full_stage)):
                opt.zero_grad(set_to_none=True)
                times[key].append(timed(fn, self.device))
            self.method.after_backward(FAR)
            times["opt"].append(timed(opt.step, self.device))
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        # Shares are differences of medians; one below the timing noise would come out
        # negative and is shown as 0 (the raw stage medians are reported beside them).
        out = {
            "backbone_ms": med["bb"],
            "heads_ms": max(0.0, med["bh"] - med["bb"]),
            "loss_ms": max(0.0, med["fb"] - med["bh"]),
            "optimizer_ms": med["opt"],
            "stage_ms": {"backbone_fwd_bwd": round(med["bb"], 3), "backbone_heads_fwd_bwd": round(med["bh"], 3),
                         "full_fwd_bwd": round(med["fb"], 3), "optimizer_step": round(med["opt"], 3)},
        }
        for name, fn in self.method.extra_timings(self.cfg.run.batch_size, self.device).items():
            out[name] = 1000 * statistics.median(timed(fn, self.device) for _ in range(max(3, steps)))
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def _syncs_per_step(sb: StepBench, device: torch.device, steps: int) -> float | None:
    n = count_syncs(lambda: [sb.step() for _ in range(steps)], device)
    return None if n is None else round(n / steps, 2)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_memory_mb": round(rss_kb / 1024, 1), "peak_memory_kind": "process max RSS (CPU)"}


def measure_step(cfg: Config, device: torch.device, steps: int, warmup: int, repeats: int, split_steps: int) -> dict:
    """images/s of the step (median of ``repeats`` runs of ``steps``) and of the plain loop's step,
    the step's split, its waits for the device (``count_syncs``, on CUDA; in the method's steady
    state and in its first epoch) and peak memory."""
    sb = StepBench(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        sb.step()
    b = cfg.run.batch_size
    runs, plain = [], []
    for _ in range(repeats):  # alternated: the engine's step, then the plain loop's
        runs.append(b * steps / timed(lambda: [sb.step() for _ in range(steps)], device))
        plain.append(b * steps / timed(lambda: [sb.plain_step() for _ in range(steps)], device))
    ips, plain_ips = statistics.median(runs), statistics.median(plain)
    out = {"images_per_s": round(ips, 2), "runs_images_per_s": [round(r, 2) for r in runs],
           "steps_per_run": steps, "ms_per_step": round(1000 * b / ips, 3),
           "plain_images_per_s": round(plain_ips, 2), "plain_runs_images_per_s": [round(r, 2) for r in plain],
           "step_over_plain": round(ips / plain_ips, 3)}
    out.update(sb.split(split_steps))
    out["syncs_per_step"] = _syncs_per_step(sb, device, steps)
    sb.engine.epoch = 0  # the first epoch's step (SwAV's queue not yet in use, CDUL's labels not yet updated)
    out["syncs_per_step_first_epoch"] = _syncs_per_step(sb, device, steps)
    sb.engine.epoch = FAR
    out["loss_includes"] = sb.method.loss_includes()
    out.update(peak_memory(device))
    return out
