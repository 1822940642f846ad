"""Throughput benchmark: the training step alone, the step fed by the real pipeline, and
the per-step communication each method adds.

Command line::

    python -m rayssl.bench [--method swav|mls|moco] [--preset cpu|gpu] [--device auto|cpu|cuda]
        [--batch-size B] [--steps N] [--warmup N] [--repeats N] [--augment-on cpu|device]
        [--data URI] [--s3-endpoint URL] [--skip step|pipeline|comm ...] [--set section.key=value ...]

Prints a readable table and, as the last stdout line, one JSON object:

* ``step``: images/s of forward + loss (Sinkhorn, queues) + backward + optimiser step on
  synthetic crops already on the device (median of ``--repeats`` runs), the time split
  into backbone, heads, loss (what the method's forward adds beyond backbone and heads:
  Sinkhorn and the swapped prediction for SwAV; the momentum encoder, queue all-gather
  and InfoNCE/BCE for MLS) and optimiser, each the median over steps, measured by
  running the step's stages separately (backbone fwd+bwd; + heads; full fwd+bwd;
  optimiser); and the peak device memory (CUDA: max allocated; CPU: the process's max RSS);
* ``pipeline``: images/s of the same step fed by the real Ray Data pipeline
  (``rayssl.data.pipeline.build_train_data``) from local WebDataset shards of JPEGs that the
  bench writes itself (or ``--data``, e.g. an ``s3://`` prefix), with ``data.augment_on``
  cpu (Ray Data crops) or device (the worker decodes and crops); ``ratio`` = pipeline/step,
  and the pipeline's ingest rate alone (``rayssl.data.bench_ingest``);
* ``comm``: bytes and time per step of the collectives the method adds (Sinkhorn marginals,
  queue-key all-gathers, MoCo's shuffled-BN gathers), recorded in ``--comm-workers`` gloo
  processes on this machine, next to the gradient all-reduce bytes of the benchmarked model
  and the time of one all-reduce of that size over the same gloo group.

``--preset cpu`` (default off CUDA): ResNet-18, 2x64 + 4x32 crops, batch 32 -- small
enough for a laptop. ``--preset gpu`` (default on CUDA): the paper's recipe, ResNet-50,
2x224 + 6x96 crops, 3000 prototypes, queue 3840, batch 256 per device, bf16 autocast,
channels_last. No Ray in the step or comm parts; the pipeline part starts a local Ray
(or joins ``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from rayssl.dist import free_port, init_local_gloo
from rayssl.storage import add_s3_flags, s3_data_overrides

# Settings layered on rayssl.presets' "quick" (cpu) or "paper" (gpu) preset.
BENCH_PRESETS: dict[str, dict] = {
    "cpu": {"preset": "quick", "scene_size": 72, "batch_size": 32,
            "overrides": {"swav": {"queue_length": 0}}},
    "gpu": {"preset": "paper", "scene_size": 256, "batch_size": 256,
            "overrides": {"data": {"crop_sizes": [224, 96], "crop_counts": [2, 6]},
                          "model": {"backbone": "resnet50"}}},
}

# What each method's forward does beyond backbone and heads (the "loss" share).
LOSS_INCLUDES = {
    "swav": "Sinkhorn-Knopp codes (float32), queue, swapped-prediction loss",
    "mls": "momentum-encoder forward (shuffled BN), queue all-gather, InfoNCE + multi-label BCE",
    "moco": "momentum-encoder forward (shuffled BN), queue all-gather, InfoNCE",
}


# ----------------------------------------------------------------------------- config


def bench_config(method: str = "swav", preset: str = "cpu", batch_size: int | None = None,
                 sets: Sequence[str] = (), augment_on: str = "cpu", source: str = "scenes"):
    """The Config the bench measures: rayssl's preset + the bench preset + ``--set``s."""
    from rayssl.config import Config, deep_merge, parse_assignment
    from rayssl.presets import resolve_preset

    bp = BENCH_PRESETS[preset]
    raw = resolve_preset(bp["preset"], "scenes", method)
    raw = deep_merge(raw, bp["overrides"] if method == "swav" else
                     {k: v for k, v in bp["overrides"].items() if k != "swav"})
    b = batch_size or bp["batch_size"]
    raw = deep_merge(raw, {"run": {"method": method, "num_workers": 1, "batch_size": b},
                           "data": {"augment_on": augment_on, "source": source}})
    if method in ("mls", "moco"):
        q = raw.get(method, {}).get("queue_size", 4096)
        raw = deep_merge(raw, {method: {"queue_size": max(b, (q // b) * b)}})
    for s in sets:
        raw = deep_merge(raw, parse_assignment(s))
    return Config.from_dict(raw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


class StepBench:
    """One worker's training step on ``device``, as rayssl.loop runs it (no Ray, no DDP)."""

    def __init__(self, cfg, device: torch.device):
        from rayssl.loop import build_optimizer
        from rayssl.methods import get_method
        from rayssl.optim import scaled_lr

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.run.seed)
        spec = get_method(cfg.run.method)
        self.method = spec.model_cls(cfg.method, cfg.model, num_crops=sum(cfg.data.crop_counts), world_size=1)
        self.method.to(device)
        self.channels_last = cfg.run.channels_last and device.type == "cuda"
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if cfg.model.compile:
            self.method.backbone.compile()  # in place, as rayssl.loop does
        self.optimizer = build_optimizer(self.method, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = scaled_lr(cfg.optim.base_lr, cfg.run.batch_size) * 0.01
        use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
        self.dtype = "bf16 autocast" if use_bf16 else "fp32"
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        # Past the queue's start epoch and the prototype freeze: every part of the step runs.
        self.epoch, self.step_no = 10**6, 10**6
        b = cfg.run.batch_size
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.crops = [self._layout(torch.randn(b, 3, s, s, generator=gen).to(device))
                      for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts) for _ in range(c)]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, crops: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """forward + loss + backward + optimiser, as the loop does (loss checked at log steps only)."""
        from rayssl.loop import checked_forward

        loss, _ = checked_forward(self.method, crops if crops is not None else self.crops, epoch=self.epoch,
                                  step=self.step_no, method_name=self.cfg.run.method, autocast=self.autocast,
                                  check_loss=False)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.method.after_backward(self.step_no)
        self.optimizer.step()
        return loss

    # -- the split ------------------------------------------------------------------------
    def _backbone_stage(self) -> None:
        m = self.method
        with self.autocast():
            if hasattr(m, "embed"):  # SwAV: every crop, same sizes batched
                from rayssl.methods.swav import group_same_size

                out = sum(m.backbone(x).float().sum() for x in group_same_size(self.crops))
            else:  # MLS / MoCo: the online encoder sees view 1
                out = m.backbone(self.crops[0]).float().sum()
        out.backward()

    def _heads_stage(self) -> None:
        m = self.method
        with self.autocast():
            if hasattr(m, "embed"):
                out = m.prototypes(m.embed(self.crops)).float().sum()
            else:
                g, z = m.queries(self.crops[0])
                out = g.sum() + z.sum()
        out.backward()

    def _full_stage(self) -> None:
        from rayssl.loop import checked_forward

        loss, _ = checked_forward(self.method, self.crops, epoch=self.epoch, step=self.step_no,
                                  method_name=self.cfg.run.method, autocast=self.autocast, check_loss=False)
        loss.backward()

    def split(self, steps: int) -> dict:
        """Median ms per step of each share (stages timed separately, differences taken)."""
        opt = self.optimizer
        times: dict[str, list[float]] = {"bb": [], "bh": [], "fb": [], "opt": []}
        for _ in range(steps):
            for key, fn in (("bb", self._backbone_stage), ("bh", self._heads_stage), ("fb", self._full_stage)):
                opt.zero_grad(set_to_none=True)
                times[key].append(_timed(fn, self.device))
            self.method.after_backward(self.step_no)
            times["opt"].append(_timed(opt.step, self.device))
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
        if hasattr(self.method, "embed"):  # SwAV: Sinkhorn alone on this batch's score shapes
            from rayssl.losses import sinkhorn_knopp

            k = self.cfg.method.num_prototypes
            rows = self.cfg.run.batch_size + (self.method.queue.length if self.method.queue is not None else 0)
            n = len(self.cfg.method.assign_crops)  # one stacked call for all code crops, as the step makes
            scores = torch.randn(n, rows, k, device=self.device).clamp_(-1, 1)
            t = [_timed(lambda: sinkhorn_knopp(scores, self.cfg.method.epsilon, self.cfg.method.sinkhorn_iterations),
                        self.device) for _ in range(max(3, steps))]
            out["sinkhorn_ms"] = 1000 * statistics.median(t)
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_memory_mb": round(rss_kb / 1024, 1), "peak_memory_kind": "process max RSS (CPU)"}


def measure_step(cfg, device: torch.device, steps: int, warmup: int, repeats: int, split_steps: int) -> dict:
    sb = StepBench(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        sb.step()
    runs = [cfg.run.batch_size * steps / _timed(lambda: [sb.step() for _ in range(steps)], device)
            for _ in range(repeats)]
    out = {"images_per_s": round(statistics.median(runs), 2), "runs_images_per_s": [round(r, 2) for r in runs],
           "steps_per_run": steps, "ms_per_step": round(1000 * cfg.run.batch_size / statistics.median(runs), 3)}
    out.update(sb.split(split_steps))
    out["loss_includes"] = LOSS_INCLUDES.get(cfg.run.method, "the method's forward beyond backbone and heads")
    out.update(_peak_memory(device))
    return out


# ----------------------------------------------------------------------------- pipeline


def write_jpeg_shards(out_dir: str, num_images: int, scene_size: int, seed: int = 0) -> str:
    """Local WebDataset shards of JPEG scenes (rayssl.data.shards, in parallel on Ray)."""
    from rayssl.data.shards import write_shards

    write_shards("scenes", out_dir, "webdataset", shard_size=max(16, num_images // 8), num_scenes=num_images,
                 scene_size=scene_size, seed=seed, image_format="jpg")
    return out_dir


def _pipeline_batches(cfg, data, device: torch.device, batch: int, channels_last: bool):
    """Endless crop batches on ``device`` from the pipeline, epoch after epoch, as the loop reads them."""
    from rayssl.eval.features import to_float_images

    import ray

    keys = [f"crop_{j}" for j in range(sum(cfg.data.crop_counts))]
    aug = None
    if cfg.data.augment_on == "device":
        from rayssl.data.gpu_augment import DeviceMultiCrop, device_crop_batches
        from rayssl.data.multicrop import crop_spec

        aug = DeviceMultiCrop(crop_spec(cfg), device, channels_last=channels_last)
    epoch = 0
    while True:
        if hasattr(data.stats, "set_epoch"):  # the epoch seeds the pipeline's augmentations
            ray.get(data.stats.set_epoch.remote(epoch))
        got = 0
        if aug is not None:
            it = device_crop_batches(data.dataset.iter_batches(batch_size=batch, drop_last=True,
                                                               batch_format="numpy"),
                                     aug, seed=cfg.run.seed, epoch=epoch)
            for b in it:
                got += 1
                yield b["crops"]
        else:
            for b in data.dataset.iter_torch_batches(batch_size=batch, drop_last=True, device=device):
                got += 1
                yield [to_float_images(b[k], channels_last=channels_last) for k in keys]
        if got == 0:
            raise RuntimeError(f"the pipeline produced no batch of {batch} images from {cfg.data.source}")
        epoch += 1


def measure_pipeline(cfg, device: torch.device, steps: int, warmup: int, repeats: int, step_ips: float | None,
                     ingest_seconds: float) -> dict:
    """The step fed by build_train_data (one consumer = one worker); median over repeats."""
    import ray

    from rayssl.data.pipeline import build_train_data

    sb = StepBench(cfg, device)
    data = build_train_data(cfg)
    batches = _pipeline_batches(cfg, data, device, cfg.run.batch_size, sb.channels_last)
    t_first = time.perf_counter()
    for _ in range(max(1, warmup)):
        sb.step(next(batches))
    first = time.perf_counter() - t_first
    runs = []
    for _ in range(repeats):
        def run():
            for _ in range(steps):
                sb.step(next(batches))
        runs.append(cfg.run.batch_size * steps / _timed(run, device))
    batches.close()
    ips = statistics.median(runs)
    out = {"images_per_s": round(ips, 2), "runs_images_per_s": [round(r, 2) for r in runs],
           "ratio": round(ips / step_ips, 3) if step_ips else None,
           "augment_on": cfg.data.augment_on, "data": cfg.data.source, "images_listed": data.num_images,
           "warmup_s": round(first, 2), "data_counts": ray.get(data.stats.get.remote(), timeout=30)}
    if ingest_seconds > 0:
        from rayssl.data import bench_ingest

        ing = bench_ingest.bench(cfg, ingest_seconds, consumers=1, batch_size=cfg.run.batch_size)
        out["ingest_alone_images_per_s"] = ing["samples_per_s"]
        if "error" in ing:
            out["ingest_error"] = ing["error"]
    return out


# ----------------------------------------------------------------------------- communication

# Caller function -> what the collective is for.
_COMM_KINDS = {
    "sinkhorn_knopp": "sinkhorn_marginals",
    "enqueue": "queue_keys_all_gather",
    "_shuffle_across_workers": "shuffled_bn",
    "_unshuffle_across_workers": "shuffled_bn",
}


def _comm_kind() -> str:
    f = sys._getframe(2)
    while f is not None:
        kind = _COMM_KINDS.get(f.f_code.co_name)
        if kind:
            return kind
        f = f.f_back
    return "other"


def _bytes_of(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes_of(t) for t in x)
    return 0


def _record_collectives(log: list) -> None:
    """Wrap torch.distributed's collectives to log (kind, payload bytes, seconds) per call.

    Payload = the tensor as all-reduced / broadcast, or the gathered result (world x input)
    for an all-gather. Timed synchronously (gloo runs the collective in the call)."""
    import torch.distributed as tdist

    def wrap(name: str, payload_arg: int):
        orig = getattr(tdist, name)

        def counted(*args, **kwargs):
            t = time.perf_counter()
            out = orig(*args, **kwargs)
            if kwargs.get("async_op"):
                out.wait()
            log.append((_comm_kind(), name, _bytes_of(args[payload_arg]), time.perf_counter() - t))
            return out

        setattr(tdist, name, counted)

    wrap("all_reduce", 0)
    wrap("broadcast", 0)
    wrap("all_gather", 0)  # args[0] is the output list: world x input bytes


def _comm_worker(rank: int, world: int, port: int, cfg_dict: dict, steps: int, grad_numel: int, out_dir: str) -> None:
    import torch.distributed as tdist

    from rayssl.config import Config
    from rayssl.methods import get_method

    torch.set_num_threads(1)
    init_local_gloo(rank, world, port)
    try:
        cfg = Config.from_dict(cfg_dict)
        torch.manual_seed(cfg.run.seed)
        method = get_method(cfg.run.method).model_cls(cfg.method, cfg.model, num_crops=sum(cfg.data.crop_counts),
                                                      world_size=world)
        b = cfg.run.batch_size // world
        crops = [torch.randn(b, 3, s, s) for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts) for _ in range(c)]
        log: list = []
        _record_collectives(log)
        for i in range(steps + 1):
            if i == 1:
                log.clear()  # the first step is a warm-up
            with torch.no_grad():
                method(crops, epoch=10**6, step=10**6)
        calls = list(log)
        grad = torch.zeros(grad_numel)
        tdist.barrier()
        t = time.perf_counter()
        tdist.all_reduce(grad)
        grad_s = time.perf_counter() - t
        torch.save({"calls": calls, "grad_s": grad_s}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def measure_comm(cfg, workers: int, per_worker_batch: int, steps: int, grad_numel: int) -> dict:
    """Per-step collectives of ``cfg``'s method over ``workers`` gloo processes on this machine.

    The step runs without gradient (the method's own collectives happen in the forward); the
    backbone is ResNet-18 whatever the benchmarked one (the method's collectives do not depend
    on it), with the benchmarked crops, prototypes, queues and ``per_worker_batch``. The
    gradient all-reduce is the benchmarked model's (``grad_numel`` float32 values).
    """
    import torch.multiprocessing as mp

    from rayssl.config import Config, deep_merge

    raw = deep_merge(cfg.to_dict(), {"run": {"num_workers": workers, "batch_size": per_worker_batch * workers},
                                     "model": {"backbone": "resnet18"}})
    m = cfg.run.method
    if m == "swav" and raw["swav"]["queue_length"]:
        per = max(per_worker_batch, raw["swav"]["queue_length"] // workers)
        raw["swav"]["queue_length"] = per * workers
    if m in ("mls", "moco"):
        g = per_worker_batch * workers
        raw[m]["queue_size"] = max(g, (raw[m]["queue_size"] // g) * g)
    comm_cfg = Config.from_dict(raw)
    with tempfile.TemporaryDirectory(prefix="rayssl-comm-") as d:
        mp.spawn(_comm_worker, args=(workers, free_port(), comm_cfg.to_dict(), steps, grad_numel, d),
                 nprocs=workers, join=True)
        results = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(workers)]
    per_step: dict[str, dict] = {}
    for kind, _name, nbytes, secs in results[0]["calls"]:
        e = per_step.setdefault(kind, {"calls": 0, "bytes": 0, "ms": 0.0})
        e["calls"] += 1
        e["bytes"] += nbytes
        e["ms"] += 1000 * secs
    for e in per_step.values():
        e["calls"] = round(e["calls"] / steps, 2)
        e["bytes"] = int(round(e["bytes"] / steps))
        e["ms"] = round(e["ms"] / steps, 3)
    added = sum(e["bytes"] for e in per_step.values())
    grad_bytes = grad_numel * 4
    return {
        "workers": workers, "per_worker_batch": per_worker_batch, "backend": "gloo, CPU processes on loopback",
        "per_step": per_step, "method_bytes_per_step": added,
        "gradient_allreduce_bytes": grad_bytes,
        "gradient_allreduce_ms": round(1000 * max(r["grad_s"] for r in results), 3),
        "method_over_gradient_bytes": round(added / grad_bytes, 6),
    }


# ----------------------------------------------------------------------------- main


def device_info(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def run_bench(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cfg = bench_config(args.method, preset, args.batch_size, args.set, args.augment_on)
    if args.warmup is None:
        queue = getattr(cfg.method, "queue_length", 0) if cfg.run.method == "swav" else 0
        args.warmup = max(2, -(-queue // cfg.run.batch_size) + 1)
    use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    result = {
        "bench": "rayssl.bench", "method": cfg.run.method, "preset": preset,
        "device": device.type, "device_name": device_info(device),
        "dtype": "bf16 autocast" if use_bf16 else "fp32",
        "batch_size": cfg.run.batch_size, "workers": 1,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "backbone": cfg.model.backbone, "small_stem": cfg.model.small_stem, "compile": cfg.model.compile,
        "optimizer": cfg.optim.optimizer,
        "crops": [f"{c}x{s}" for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts)],
        "channels_last": bool(cfg.run.channels_last and device.type == "cuda"),
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    if cfg.run.method == "swav":
        result.update(num_prototypes=cfg.method.num_prototypes, queue_length=cfg.method.queue_length)
    else:
        result.update(queue_size=cfg.method.queue_size)
    step_ips = None
    if "step" not in args.skip:
        result["step"] = measure_step(cfg, device, args.steps, args.warmup, args.repeats, args.split_steps)
        step_ips = result["step"]["images_per_s"]
    if "pipeline" not in args.skip:
        result["pipeline"] = _with_ray(lambda ray: _pipeline_part(args, cfg, preset, device, step_ips, ray))
    if "comm" not in args.skip:
        from rayssl.methods import get_method

        m = get_method(cfg.run.method).model_cls(cfg.method, cfg.model, num_crops=sum(cfg.data.crop_counts),
                                                 world_size=1)
        grad_numel = sum(p.numel() for p in m.parameters() if p.requires_grad)
        del m
        result["comm"] = measure_comm(cfg, args.comm_workers, args.comm_batch, args.comm_steps, grad_numel)
    return result


def _with_ray(fn):
    import ray

    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1", include_dashboard=False,
                     log_to_driver=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    try:
        return fn(ray)
    finally:
        if started:
            ray.shutdown()


def _pipeline_part(args, cfg, preset: str, device: torch.device, step_ips, ray) -> dict:
    from rayssl.config import Config, deep_merge

    with tempfile.TemporaryDirectory(prefix="rayssl-bench-") as d:
        source = args.data
        if not source:
            n = args.num_images or cfg.run.batch_size * (args.warmup + args.steps * args.repeats + 2)
            source = write_jpeg_shards(os.path.join(d, "shards"), n, BENCH_PRESETS[preset]["scene_size"],
                                       seed=cfg.run.seed)
        data = {"source": source}
        data.update(s3_data_overrides(args))
        pcfg = Config.from_dict(deep_merge(cfg.to_dict(), {"data": data}))
        out = measure_pipeline(pcfg, device, args.steps, args.warmup, args.repeats, step_ips, args.ingest_seconds)
        out["ray_cpus"] = ray.cluster_resources().get("CPU", 0)
        if not args.data:
            out["data"] = f"local WebDataset shards of JPEG scenes ({BENCH_PRESETS[preset]['scene_size']} px)"
        return out


def format_table(r: dict) -> str:
    lines = [f"rayssl.bench  method={r['method']} preset={r['preset']} device={r['device_name']} dtype={r['dtype']}",
             f"  backbone={r['backbone']} crops={'+'.join(r['crops'])} batch={r['batch_size']} workers={r['workers']} "
             f"cpus={r['cpus']} repeats={r['repeats']}"]
    s = r.get("step")
    if s:
        lines += [f"  step      {s['images_per_s']:>10.1f} img/s   ({s['ms_per_step']:.1f} ms/step, runs "
                  f"{s['runs_images_per_s']})",
                  f"    backbone {s['backbone_ms']:.1f} ms | heads {s['heads_ms']:.1f} ms | loss {s['loss_ms']:.1f} ms "
                  f"| optimiser {s['optimizer_ms']:.1f} ms" + (f" | (Sinkhorn alone {s['sinkhorn_ms']:.2f} ms)"
                                                            if "sinkhorn_ms" in s else ""),
                  f"    peak memory {s['peak_memory_mb']:.0f} MiB ({s['peak_memory_kind']})"]
    p = r.get("pipeline")
    if p:
        ratio = f"{p['ratio']:.2f}" if p.get("ratio") is not None else "n/a"
        lines.append(f"  pipeline  {p['images_per_s']:>10.1f} img/s   (ratio pipeline/step {ratio}, "
                     f"augment_on={p['augment_on']}, ray cpus {p.get('ray_cpus')}"
                     + (f", ingest alone {p['ingest_alone_images_per_s']} img/s" if "ingest_alone_images_per_s" in p
                        else "") + ")")
    c = r.get("comm")
    if c:
        lines.append(f"  comm      {c['workers']} workers x batch {c['per_worker_batch']} ({c['backend']}):")
        for kind, e in sorted(c["per_step"].items()):
            lines.append(f"    {kind:<24} {e['calls']:>5} calls {e['bytes']:>12,d} B {e['ms']:>9.3f} ms / step")
        lines.append(f"    method total {c['method_bytes_per_step']:,d} B/step vs gradient all-reduce "
                     f"{c['gradient_allreduce_bytes']:,d} B ({c['gradient_allreduce_ms']:.1f} ms): "
                     f"ratio {c['method_over_gradient_bytes']:.2e}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rayssl.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="swav", help="swav | mls | moco")
    p.add_argument("--preset", choices=list(BENCH_PRESETS), default=None,
                   help="cpu (small) or gpu (ResNet-50, 2x224+6x96); default: gpu on CUDA, else cpu")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 2, or enough to fill SwAV's queue so the timed steps use it)")
    p.add_argument("--repeats", type=int, default=3, help="runs; figures are their median")
    p.add_argument("--split-steps", type=int, default=3, help="steps for the backbone/heads/loss/optimiser split")
    p.add_argument("--augment-on", choices=["cpu", "device"], default="cpu",
                   help="pipeline part: multi-crop in Ray Data (cpu) or on the training device (device)")
    p.add_argument("--data", default="", help="pipeline source (folder, s3:// prefix, shards); default: "
                                              "local JPEG shards written by the bench")
    add_s3_flags(p)
    p.add_argument("--num-images", type=int, default=0, help="images in the bench's own shards (default: enough)")
    p.add_argument("--ingest-seconds", type=float, default=5.0, help="ingest-alone measurement (0: skip)")
    p.add_argument("--comm-workers", type=int, default=2, help="processes for the communication measurement")
    p.add_argument("--comm-batch", type=int, default=8, help="per-worker batch of the communication measurement")
    p.add_argument("--comm-steps", type=int, default=3, help="measured steps of the communication measurement")
    p.add_argument("--skip", action="append", default=[], choices=["step", "pipeline", "comm"])
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)

    from rayssl.config import ConfigError

    for name in ("steps", "repeats", "split_steps", "comm_workers", "comm_batch", "comm_steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.device != "auto" and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA device is available", file=sys.stderr)
        return 2
    try:
        result = run_bench(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
