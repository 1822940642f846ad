"""The GPU check: on a fresh GPU machine, the figures the CPU cannot give, in one JSON file.

``run_gpu_check`` measures, in order of what matters most, each part once, writing the JSON
after every part (a check cut short keeps what it measured):

1. ``step``: SwAV's step (``Engine.train_step``), ResNet-50, 2x224 + 6x96, batch 64, bf16,
   channels_last, LARS, 3000 prototypes, queue full (``--preset gpu`` at batch 64);
2. ``quality``: SwAV on the built-in scenes, the default recipe, for the epochs that fit in
   ``quality_s`` (``rayssl.bench.quality``), its kNN against its own random init, and what the
   trained and random-init features encode (``rayssl.eval.probes``, 2,000 / 1,000 scenes);
3. ``device_fed``: the step fed by ``augment_on=device`` in one process, no Ray
   (``rayssl.bench.device_fed``): nvJPEG decoding and the multi-crop on the GPU before each step;
4. ``pipeline_device`` / ``pipeline_cpu``: the same step fed by the Ray Data pipeline from JPEG
   shards with ``augment_on`` device (the goal's ratio) and cpu (beside the DataLoader
   baseline); they need Ray;
5. ``step_cudnn_heuristics``: the ResNet-50 step with ``run.cudnn_benchmark=false`` (cuDNN's
   heuristic algorithms instead of timed ones: what the setting buys), in a fresh process, since
   cuDNN reuses the algorithms it timed for the earlier parts whatever the setting;
6. ``step_mls``: MLS's step, ResNet-50, its two 224 px views, queue full (BCE term timed);
7. ``step_cdul``: CDUL's step, ResNet-50, its two 224 px views, in a label-update epoch, on a
   table of random soft labels (80 classes; timing only), the image index on the host as the
   worker's feed hands it over;
8. ``step_vit``: the step with ``timm:vit_small_patch16_224`` (needs timm);
9. ``step_compile`` / ``step_cudagraphs``: the ResNet-50 step with ``torch.compile``, inductor
   and CUDA graphs.

Every step part also counts the step's waits for the GPU (``syncs_per_step``, and in the
method's first epoch ``syncs_per_step_first_epoch``; CUDA's sync debug mode).

A part that would end past ``budget_s`` is skipped and says so, as is one whose package is
missing, and one left out (``skip``: every part but ``step`` can be). ``goals`` compares the
figures with issue 26's: >= 1,000 img/s per H100-class GPU for the ResNet-50 step (aim 1,500)
and pipeline/step >= 0.9 with ``augment_on=device`` (from ``pipeline_device``; without Ray,
``device_fed``'s ratio stands in for it and says so).
``dry_run``: the same parts at tiny sizes on the CPU (timm's 0.4 M-parameter test ResNet, 2x32 +
2x16, batch 8, a few seconds of quality run on 32 px scenes cut 2x32 + 4x16, compile traced by
the eager backend), to test the script.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import multiprocessing
import os
import platform
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rayssl.bench.config import bench_config, bench_warmup
from rayssl.bench.device_fed import measure_device_fed
from rayssl.bench.quality import quality_run
from rayssl.bench.step import measure_step
from rayssl.config import Config, apply_assignments
from rayssl.outfile import write_bytes
from rayssl.presets import layered_config

__all__ = ["GOALS", "PARTS", "CheckOptions", "check_goals", "in_fresh_process", "measure_step_part", "run_gpu_check",
           "step_config"]

# The dry run's backbone: timm's test ResNet (0.4 M parameters, batch norm), a fortieth of
# ResNet-18's step on a CPU without AVX-512: the dry run tests the script, not the figures.
TEST_RESNET = ("model.backbone=timm:test_resnet", "model.small_stem=false")
# CDUL's step part: a table of random soft labels (timing only), COCO's 80 classes.
CDUL_ROWS, CDUL_CLASSES = 4096, 80

# The parts that time the goal's step (SwAV, ResNet-50, 2x224 + 6x96), in their variants.
SWAV_RESNET50_STEPS = ("step", "step_cudnn_heuristics", "step_compile", "step_cudagraphs")
# Every part, in the order measured (``_parts``); all but ``step``, the figure the others are
# read against, can be left out (``CheckOptions.skip``).
PARTS = ("step", "quality", "device_fed", "pipeline_device", "pipeline_cpu", "step_cudnn_heuristics", "step_mls",
         "step_cdul", "step_vit", "step_compile", "step_cudagraphs")
GOALS = {"step_images_per_s": 1000.0, "step_images_per_s_aim": 1500.0, "pipeline_over_step_device": 0.9}


@dataclass
class CheckOptions:
    out: str  # the JSON file (the command line refuses one that exists)
    device: str = "cuda"
    dry_run: bool = False
    budget_s: float = 480.0  # the whole check
    quality_s: float = 120.0  # the quality run's training
    batch_size: int = 64  # per GPU
    skip: tuple[str, ...] = ()  # parts left out (e.g. those an earlier check measured), so others fit the budget


@dataclass
class Part:
    name: str
    estimate_s: float  # what it may take on a GPU, to decide whether it still fits
    run: Callable[[], dict]
    needs: str = ""  # a package it needs ("ray", "timm", "pyarrow"); skipped without it


def _sizes(opts: CheckOptions) -> dict:
    """Step counts and sizes: the real ones, or the dry run's tiny ones."""
    if opts.dry_run:
        return {"preset": "cpu", "batch": 8, "steps": 1, "warmup": 1, "repeats": 1, "split": 1, "num_images": 24,
                "scene_size": 40,
                "sets": ("data.crop_sizes=[32,16]", "data.crop_counts=[2,2]", "swav.num_prototypes=32", *TEST_RESNET),
                "vit": ("model.backbone=timm:test_vit", "model.small_stem=false"), "compile_backend": "eager"}
    return {"preset": "gpu", "batch": opts.batch_size, "steps": 10, "warmup": None, "repeats": 3, "split": 3,
            "num_images": 0, "scene_size": 256, "sets": ("run.precision=bf16", "run.channels_last=true"),
            "vit": ("model.backbone=timm:vit_small_patch16_224",), "compile_backend": "inductor"}


def _quality_config(opts: CheckOptions) -> Config:
    """``python -m rayssl.train``'s config (dry run: tiny scenes and heads)."""
    if not opts.dry_run:
        return layered_config({})
    raw = {"data": {"scenes_num_images": 48, "scenes_image_size": 32, "crop_sizes": [32, 16]},
           "run": {"batch_size": 16},
           "eval": {"num_train_images": 40, "num_test_images": 20},
           "swav": {"num_prototypes": 16, "projection_hidden_dim": 32, "projection_dim": 16}}
    return layered_config(apply_assignments(raw, TEST_RESNET))


def step_config(opts: CheckOptions, *sets: str, method: str = "swav") -> Config:
    """The config a step part measures (``sets``: the part's own ``--set``s). MLS/MoCo and CDUL take their
    paper preset's two views (2 x 224; the dry run's 2 x 32) instead of SwAV's multi-crop."""
    z = _sizes(opts)
    base = z["sets"]
    if method != "swav" and opts.dry_run:
        base = (*(x for x in base if not x.startswith(("swav.", "data.crop_"))), "data.crop_sizes=[32]")
    return bench_config(method, z["preset"], z["batch"], (*base, *sets))


def measure_step_part(opts: CheckOptions, device: str, sets: tuple[str, ...] = (), method: str = "swav") -> dict:
    """One step part: the config it measures and ``measure_step``'s figures."""
    cfg = step_config(opts, *sets, method=method)
    z = _sizes(opts)
    return {**_describe(cfg), **measure_step(cfg, torch.device(device), z["steps"], bench_warmup(cfg, z["warmup"]),
                                             z["repeats"], z["split"])}


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new (spawned) Python process: nothing this process cached reaches it
    (cuDNN keeps the algorithms it chose per process, whatever ``cudnn.benchmark`` says later)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _parts(opts: CheckOptions, device: torch.device, result: dict) -> list[Part]:
    z = _sizes(opts)

    def step(*sets: str, method: str = "swav") -> dict:
        return measure_step_part(opts, str(device), sets, method)

    def fed(augment_on: str, parts: tuple[str, ...]) -> dict:
        from rayssl.bench.run import BenchOptions, run_bench  # needs Ray

        r = run_bench(BenchOptions(method="swav", preset=z["preset"], device=str(device), batch_size=z["batch"],
                                   steps=z["steps"], warmup=z["warmup"], repeats=z["repeats"], augment_on=augment_on,
                                   num_images=z["num_images"], ingest_seconds=0.0 if opts.dry_run else 5.0,
                                   dataloader_ingest=False,  # Ray Data's ingest alone only: the budget
                                   parts=parts, sets=z["sets"]))
        step_ips = (result["parts"].get("step") or {}).get("images_per_s")
        out = {k: r[k] for k in ("pipeline", "dataloader", "pipeline_over_dataloader") if k in r}
        if step_ips and "images_per_s" in out.get("pipeline", {}):
            out["pipeline"]["ratio"] = round(out["pipeline"]["images_per_s"] / step_ips, 3)
        return out

    def device_fed() -> dict:
        cfg = step_config(opts)
        return {**_describe(cfg), **measure_device_fed(cfg, device, z["steps"], bench_warmup(cfg, z["warmup"]),
                                                       z["repeats"], z["scene_size"])}

    def cdul_step() -> dict:
        from rayssl.data.pseudo_labels import scenes_source, write_soft_labels  # the label table: pyarrow

        rows = max(CDUL_ROWS, z["batch"])
        soft = np.random.default_rng(0).random((rows, CDUL_CLASSES), dtype=np.float32)
        with tempfile.TemporaryDirectory(prefix="rayssl-gpu-check-labels-") as labels:
            write_soft_labels(labels, [f"class {i}" for i in range(CDUL_CLASSES)], soft,
                              scenes_source(0, z["scene_size"], rows))
            return {**step(f"cdul.pseudo_labels={labels}", method="cdul"), "labels": "random (timing only)",
                    "label_rows": rows, "classes": CDUL_CLASSES}

    q_seconds = 3.0 if opts.dry_run else opts.quality_s
    return [
        Part("step", 60, lambda: step()),
        Part("quality", q_seconds + 60,
             lambda: quality_run(_quality_config(opts), device, q_seconds, workers=1 if opts.dry_run else None,
                                 probe_sizes=(40, 20) if opts.dry_run else (2000, 1000))),
        Part("device_fed", 45, device_fed),
        Part("pipeline_device", 60, lambda: fed("device", ("pipeline",)), needs="ray"),  # the goal's: first
        Part("pipeline_cpu", 100, lambda: fed("cpu", ("pipeline", "dataloader")), needs="ray"),
        Part("step_cudnn_heuristics", 50, lambda: in_fresh_process(measure_step_part, opts, str(device),
                                                                   ("run.cudnn_benchmark=false",))),
        Part("step_mls", 40, lambda: step(method="mls")),
        Part("step_cdul", 40, cdul_step, needs="pyarrow"),
        Part("step_vit", 60, lambda: step(*z["vit"]), needs="timm"),
        Part("step_compile", 150, lambda: step("model.compile=true", f"model.compile_backend={z['compile_backend']}")),
        Part("step_cudagraphs", 120, lambda: step("model.compile=true", "model.compile_backend="
                                                  + ("eager" if opts.dry_run else "cudagraphs"))),
    ]


def _describe(cfg: Config) -> dict:
    return {"method": cfg.run.method, "backbone": cfg.model.backbone, "batch_size": cfg.run.batch_size, "precision": cfg.run.precision,
            "crops": [f"{c}x{s}" for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts)],
            "compile": cfg.model.compile, "channels_last": cfg.run.channels_last,
            "cudnn_benchmark": cfg.run.cudnn_benchmark}


def check_goals(parts: dict, dry_run: bool) -> dict:
    """Issue 26's goals against the figures (``met`` is None where nothing was measured, and on
    a dry run, whose sizes are not the goals')."""
    steps = [p["images_per_s"] for k, p in parts.items() if k in SWAV_RESNET50_STEPS and "images_per_s" in p]
    best = max(steps) if steps else None
    # From the Ray pipeline; without Ray, from device_fed: the worker's side alone, a ceiling
    # (below the goal it is missed; above it, Ray's shipping is still unmeasured: met unknown).
    ratio = ((parts.get("pipeline_device") or {}).get("pipeline") or {}).get("ratio")
    source = "pipeline_device" if ratio is not None else None
    if ratio is None and (parts.get("device_fed") or {}).get("ratio") is not None:
        ratio, source = parts["device_fed"]["ratio"], "device_fed (no Ray: the worker's decode + crop only)"
    ratio_met = None if ratio is None or dry_run else ratio >= GOALS["pipeline_over_step_device"]
    if ratio_met and source != "pipeline_device":
        ratio_met = None
    return {
        "step_images_per_s": {"measured": best, "goal": GOALS["step_images_per_s"],
                              "aim": GOALS["step_images_per_s_aim"],
                              "met": None if best is None or dry_run else best >= GOALS["step_images_per_s"]},
        "pipeline_over_step_device": {"measured": ratio, "from": source, "goal": GOALS["pipeline_over_step_device"],
                                      "met": ratio_met},
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_gpu_check(opts: CheckOptions, log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every part that fits in the budget; the result is also written to ``opts.out``."""
    device = torch.device(opts.device)
    t0 = time.perf_counter()
    result = {"gpu_check": 1, "dry_run": opts.dry_run, "date": dt.datetime.now(dt.timezone.utc).isoformat(
              timespec="seconds"), "device": device.type, "device_name": _device_name(device),
              "torch": torch.__version__, "cuda": torch.version.cuda, "budget_s": opts.budget_s, "parts": {}}
    with contextlib.ExitStack() as stack:  # one Ray session for the parts that need Ray, from the first
        ray_started = False
        for part in _parts(opts, device, result):
            elapsed = time.perf_counter() - t0
            if part.name in opts.skip:
                result["parts"][part.name] = {"skipped": "left out (--skip)"}
            elif part.needs and importlib.util.find_spec(part.needs) is None:
                result["parts"][part.name] = {"skipped": f"{part.needs} is not installed"}
            elif not opts.dry_run and elapsed + part.estimate_s > opts.budget_s:
                result["parts"][part.name] = {"skipped": f"over the budget: {elapsed:.0f} s spent, this part may "
                                                         f"take {part.estimate_s:.0f} s of the {opts.budget_s:.0f} s"}
            else:
                log(f"gpu check: {part.name} ({elapsed:.0f} s so far)")
                t = time.perf_counter()
                try:
                    if part.needs == "ray" and not ray_started:
                        from rayssl.runtime.cluster import ray_session

                        stack.enter_context(ray_session(dashboard=False, log_to_driver=False))
                        ray_started = True
                    result["parts"][part.name] = {**part.run(), "part_s": round(time.perf_counter() - t, 1)}
                except Exception as exc:  # one part failing must not lose the others' figures
                    result["parts"][part.name] = {"error": f"{type(exc).__name__}: {exc}",
                                                  "traceback": traceback.format_exc(limit=8)[-3000:]}
            result["goals"] = check_goals(result["parts"], opts.dry_run)
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            write_bytes(opts.out, (json.dumps(result, indent=2) + "\n").encode())  # whole, after every part
    return result
