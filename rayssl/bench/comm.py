"""The collectives each method adds to a step: bytes and time per step, next to the gradient all-reduce.

Recorded in ``workers`` gloo processes on this machine by wrapping torch.distributed's
collectives (the method's step runs without gradient: its own collectives happen in the
forward), next to the gradient all-reduce bytes of the benchmarked model and the time of one
all-reduce of that size over the same gloo group. No Ray.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from rayssl.bench.config import fitted
from rayssl.config import Config, deep_merge
from rayssl.dist import free_port, init_local_gloo
from rayssl.engine import new_method

__all__ = ["measure_comm"]

# Caller function -> what the collective is for.
_COMM_KINDS = {
    "sinkhorn_knopp": "sinkhorn_marginals",
    "enqueue": "queue_keys_all_gather",
    "_shuffle_across_workers": "shuffled_bn",
    "_unshuffle_across_workers": "shuffled_bn",
    "_share_label_updates": "label_updates_all_gather",
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

    Payload = the tensor as all-reduced / broadcast, the gathered result (world x input) for an
    all-gather, the rows received for an all-to-all. Timed synchronously (gloo runs the collective in the call)."""
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
    wrap("all_to_all_single", 0)  # args[0] is the output: what this rank received


def _comm_worker(rank: int, world: int, port: int, cfg_dict: dict, steps: int, grad_numel: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_local_gloo(rank, world, port)
    try:
        cfg = Config.from_dict(cfg_dict)
        method = new_method(cfg, world)  # as constructed: no weights loaded, nothing compiled
        b = cfg.run.batch_size // world
        crops = [torch.randn(b, 3, s, s) for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts) for _ in range(c)]
        columns = method.example_columns(b, torch.Generator().manual_seed(rank))  # (CDUL: this worker's images)
        log: list = []
        _record_collectives(log)
        for i in range(steps + 1):
            if i == 1:
                log.clear()  # the first step is a warm-up
            with torch.no_grad():
                method(crops, epoch=10**6, step=10**6, **columns)
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
    raw = deep_merge(cfg.to_dict(), {"run": {"num_workers": workers, "batch_size": per_worker_batch * workers},
                                     "model": {"backbone": "resnet18"}})
    comm_cfg = Config.from_dict(fitted(raw, cfg.run.method, per_worker_batch * workers, workers))
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
