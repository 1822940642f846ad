"""One benchmark run: the step alone, the step fed by the pipeline, the communication, the ingest.

``run_bench`` measures the parts a ``BenchOptions`` asks for and returns one dict (the JSON
line of ``python -m rayssl.bench``); ``format_table`` is its readable form. The pipeline and
ingest parts need Ray (a local one is started, or ``RAY_ADDRESS`` joined); the step and
communication parts do not.

``--preset cpu`` (default off CUDA): ResNet-18, 2x64 + 4x32 crops, batch 32 -- small enough for
a laptop. ``--preset gpu`` (default on CUDA): the paper's recipe, ResNet-50, 2x224 + 6x96
crops, 3000 prototypes, queue 3840, batch 256 per device, bf16 autocast, channels_last.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rayssl.bench.comm import measure_comm
from rayssl.bench.config import BENCH_PRESETS, bench_config, bench_warmup, ingest_config
from rayssl.bench.step import measure_step
from rayssl.config import Config, deep_merge
from rayssl.engine import autocast_for, build_method, training_precision, uses_channels_last

if TYPE_CHECKING:
    from rayssl.data.sources import Source

# The pipeline, DataLoader and ingest parts (Ray Data, and the data functions its tasks run) are
# imported where they are measured: the step and communication parts run where Ray is not
# installed (a GPU machine with torch alone).

PARTS = ("step", "pipeline", "dataloader", "comm", "ingest")

__all__ = ["PARTS", "BenchOptions", "format_table", "run_bench"]


@dataclass
class BenchOptions:
    """What to measure and how (the options of ``python -m rayssl.bench``)."""

    method: str = "swav"
    preset: str | None = None  # cpu | gpu; default: gpu on CUDA, else cpu
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int | None = None  # default: the preset's
    steps: int = 5  # timed steps per run
    warmup: int | None = None  # untimed steps first; default enough to fill the method's queues
    repeats: int = 3  # runs; figures are their median
    split_steps: int = 3
    augment_on: str = "cpu"
    data: str = ""  # pipeline / ingest source; default: local JPEG shards written by the bench
    data_options: dict = field(default_factory=dict)  # data.s3_endpoint / data.s3_anonymous given
    num_images: int = 0  # images in the bench's own shards (0: enough)
    ingest_seconds: float = 5.0
    dataloader_ingest: bool = True  # with ingest_seconds > 0: the DataLoader's ingest alone too
    consumers: int = 1  # ingest: parallel consumers (streaming_split), like workers
    comm_workers: int = 2
    comm_batch: int = 8
    comm_steps: int = 3
    parts: tuple[str, ...] = ("step", "pipeline", "dataloader", "comm")  # ingest is measured inside pipeline
    sets: tuple[str, ...] = ()

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def device_info(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads)")


def bench_preset(opts: BenchOptions) -> str:
    return opts.preset or ("gpu" if opts.torch_device().type == "cuda" else "cpu")


def ingest_only_config(opts: BenchOptions) -> Config:
    """The pipeline's config that ``--only ingest`` measures (the command checks its source early)."""
    return ingest_config({"source": opts.data, **opts.data_options}, BENCH_PRESETS[bench_preset(opts)]["preset"],
                         opts.batch_size or 32, opts.sets)


def run_bench(opts: BenchOptions, source: Source | None = None) -> dict:
    """The bench's figures. ``source``: the listing of ``opts.data`` where the caller already has it
    (the command checks the source before Ray starts), so that a bucket is listed once, not per part."""
    device = opts.torch_device()
    preset = bench_preset(opts)
    if opts.parts == ("ingest",):
        return _ingest_only(opts, preset, source)
    cfg = bench_config(opts.method, preset, opts.batch_size, opts.sets, opts.augment_on)
    warmup = bench_warmup(cfg, opts.warmup)
    precision = training_precision(cfg, device)
    result = {
        "bench": "rayssl.bench", "method": cfg.run.method, "preset": preset,
        "device": device.type, "device_name": device_info(device), "dtype": autocast_for(precision, device)[1],
        "batch_size": cfg.run.batch_size, "workers": 1, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "backbone": cfg.model.backbone, "small_stem": cfg.model.small_stem, "compile": cfg.model.compile,
        "optimizer": cfg.optim.optimizer,
        "crops": [f"{c}x{s}" for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts)],
        "channels_last": uses_channels_last(cfg, device, precision), "repeats": opts.repeats, "warmup": warmup,
        "torch": torch.__version__,
        **dataclasses.asdict(cfg.method),
    }
    step_ips = None
    if "step" in opts.parts:
        result["step"] = measure_step(cfg, device, opts.steps, warmup, opts.repeats, opts.split_steps)
        step_ips = result["step"]["images_per_s"]
    fed = [part for part in ("pipeline", "dataloader") if part in opts.parts]
    table = cfg.method.indexed_data()
    if fed and table:  # (CDUL) a run reads the images its table lists, by index, not the bench's shards
        why = (f"skipped: --method {cfg.run.method} trains on the images {table} lists, each with its index, and "
               "these parts feed the step from the bench's own JPEG shards; a run's summary gives its pipeline's "
               "images/s and waits for data (python -m rayssl.train)")
        result.update({part: {"skipped": why} for part in fed})
    elif fed:
        from rayssl.runtime.cluster import ray_session

        with ray_session(dashboard=False, log_to_driver=False):
            result.update(_fed(opts, cfg, preset, device, step_ips, warmup, source))
        p, dl = result.get("pipeline", {}), result.get("dataloader", {})
        if "images_per_s" in p and "images_per_s" in dl:
            result["pipeline_over_dataloader"] = round(p["images_per_s"] / dl["images_per_s"], 3)
        if p.get("augment_on") == "cpu" and p.get("ingest_alone_images_per_s") and dl.get("ingest_alone_images_per_s"):
            # (with augment_on=device Ray Data's ingest ships bytes, the DataLoader's crops: no ratio)
            result["ingest_pipeline_over_dataloader"] = round(
                p["ingest_alone_images_per_s"] / dl["ingest_alone_images_per_s"], 3)
    if "comm" in opts.parts:
        grad_numel = sum(p.numel() for p in build_method(cfg, torch.device("cpu"))[0].parameters() if p.requires_grad)
        result["comm"] = measure_comm(cfg, opts.comm_workers, opts.comm_batch, opts.comm_steps, grad_numel)
    return result


def _fed(opts: BenchOptions, cfg: Config, preset: str, device: torch.device, step_ips, warmup: int,
         source: Source | None) -> dict:
    """The step fed by the Ray Data pipeline and/or by a plain DataLoader, from the same files,
    listed once for all the parts."""
    from rayssl.bench.dataloader import measure_dataloader, measure_dataloader_ingest
    from rayssl.bench.pipeline import measure_pipeline, write_jpeg_shards
    from rayssl.data.pipeline import data_listing
    from rayssl.runtime.cluster import capacity

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="rayssl-bench-") as d:
        uri = opts.data
        if not uri:
            n = opts.num_images or cfg.run.batch_size * (warmup + opts.steps * opts.repeats + 2)
            uri = write_jpeg_shards(os.path.join(d, "shards"), n, BENCH_PRESETS[preset]["scene_size"],
                                    seed=cfg.run.seed)
            source = None  # (a caller's listing is of opts.data)
        pcfg = Config.from_dict(deep_merge(cfg.to_dict(), {"data": {"source": uri, **opts.data_options}}))
        source = data_listing(pcfg.data, source)
        scenes = BENCH_PRESETS[preset]["scene_size"]
        what = uri if opts.data else f"local WebDataset shards of JPEG scenes ({scenes} px)"
        if "pipeline" in opts.parts:
            p = measure_pipeline(pcfg, device, opts.steps, warmup, opts.repeats, step_ips, opts.ingest_seconds,
                                 source=source)
            p["ray_cpus"] = capacity()[0].get("CPU", 0)
            out["pipeline"] = {**p, "data": what}
        if "dataloader" in opts.parts:
            dl = measure_dataloader(pcfg, device, opts.steps, warmup, opts.repeats, source=source)
            if step_ips and "images_per_s" in dl:
                dl["ratio"] = round(dl["images_per_s"] / step_ips, 3)
            if "images_per_s" in dl and opts.ingest_seconds > 0 and opts.dataloader_ingest:
                ing = measure_dataloader_ingest(pcfg, opts.ingest_seconds, source=source)
                dl.update(ingest_alone_images_per_s=ing.get("samples_per_s"),
                          ingest_alone_epochs=ing.get("epochs_completed"), ingest_num_workers=ing["num_workers"])
                if "error" in ing:
                    dl["ingest_error"] = ing["error"]
            out["dataloader"] = {**dl, "data": what}
    return out


def _ingest_only(opts: BenchOptions, preset: str, source: Source | None) -> dict:
    """Decoded + augmented samples/s out of the pipeline on ``opts.data``, no training; and out
    of the DataLoader baseline on the same files (one worker per core), where it reads them.
    Both read one listing of ``opts.data`` (``source``, or listed here)."""
    from rayssl.bench.dataloader import measure_dataloader_ingest
    from rayssl.bench.pipeline import measure_ingest
    from rayssl.data.pipeline import data_listing
    from rayssl.runtime.cluster import ray_session

    cfg = ingest_only_config(opts)
    source = data_listing(cfg.data, source)
    with ray_session(dashboard=False, log_to_driver=False):
        out = {"bench": "rayssl.bench", "preset": preset,
               "ingest": measure_ingest(cfg, opts.ingest_seconds, opts.consumers, cfg.run.batch_size, source=source)}
    if opts.dataloader_ingest:
        out["dataloader_ingest"] = dl = measure_dataloader_ingest(cfg, opts.ingest_seconds, source=source)
        if cfg.data.augment_on == "cpu" and dl.get("samples_per_s") and out["ingest"]["samples_per_s"]:
            out["ingest_pipeline_over_dataloader"] = round(out["ingest"]["samples_per_s"] / dl["samples_per_s"], 3)
    return out


def _whole(epochs: int | None) -> str:
    return f"{epochs} whole epoch{'' if epochs == 1 else 's'}"


def format_table(r: dict) -> str:
    if "ingest" in r and "method" not in r:
        i, dl = r["ingest"], r.get("dataloader_ingest")
        line = (f"rayssl.bench  ingest {i['data']} ({i['kind']}): {i['samples_per_s']:.1f} samples/s over "
                f"{i['seconds']} s ({_whole(i['epochs_completed'])} of {i['images_listed']} images), first batch "
                f"after {i['time_to_first_batch_s']} s, {i['consumers']} consumer(s), crops {'+'.join(i['crops'])}")
        if dl and ("skipped" in dl or "error" in dl):
            line += f"\n  dataloader  {dl.get('skipped') or dl['error']}"
        elif dl:
            ratio = (f"{r['ingest_pipeline_over_dataloader']:.2f}" if "ingest_pipeline_over_dataloader" in r
                     else "n/a")
            line += (f"\n  dataloader  {dl['samples_per_s']:.1f} samples/s over {dl['seconds']} s "
                     f"({_whole(dl['epochs_completed'])}), first batch after {dl['time_to_first_batch_s']} s; "
                     f"{dl['num_workers']} workers, the same files and crops; pipeline/dataloader {ratio}")
        return line
    lines = [f"rayssl.bench  method={r['method']} preset={r['preset']} device={r['device_name']} dtype={r['dtype']}",
             f"  backbone={r['backbone']} crops={'+'.join(r['crops'])} batch={r['batch_size']} workers={r['workers']} "
             f"cpus={r['cpus']} repeats={r['repeats']}"]
    s = r.get("step")
    if s:
        lines += [f"  step      {s['images_per_s']:>10.1f} img/s   ({s['ms_per_step']:.1f} ms/step, runs "
                  f"{s['runs_images_per_s']})",
                  f"  plain loop{s['plain_images_per_s']:>10.1f} img/s   (the same step in a hand-written PyTorch "
                  f"loop; step/plain {s['step_over_plain']:.3f})",
                  f"    backbone {s['backbone_ms']:.1f} ms | heads {s['heads_ms']:.1f} ms | loss {s['loss_ms']:.1f} ms "
                  f"| optimiser {s['optimizer_ms']:.1f} ms" + (f" | (Sinkhorn alone {s['sinkhorn_ms']:.2f} ms)"
                                                            if "sinkhorn_ms" in s else ""),
                  f"    peak memory {s['peak_memory_mb']:.0f} MiB ({s['peak_memory_kind']})"]
    p = r.get("pipeline")
    if p and "skipped" in p:
        lines.append(f"  pipeline  {p['skipped']}")
    elif p:
        ratio = f"{p['ratio']:.2f}" if p.get("ratio") is not None else "n/a"
        lines.append(f"  pipeline  {p['images_per_s']:>10.1f} img/s   (ratio pipeline/step {ratio}, "
                     f"augment_on={p['augment_on']}, ray cpus {p.get('ray_cpus')}"
                     + (f", ingest alone {p['ingest_alone_images_per_s']} img/s, {_whole(p['ingest_alone_epochs'])}"
                        if "ingest_alone_images_per_s" in p else "") + ")")
    dl = r.get("dataloader")
    if dl and "images_per_s" in dl:
        ratio = f"{dl['ratio']:.2f}" if dl.get("ratio") is not None else "n/a"
        lines.append(f"  dataloader{dl['images_per_s']:>10.1f} img/s   (the step fed by a torch DataLoader, "
                     f"{dl['num_workers']} workers, same files and crops; ratio dataloader/step {ratio}"
                     + (f"; pipeline/dataloader {r['pipeline_over_dataloader']:.2f}" if "pipeline_over_dataloader" in r
                        else "")
                     + (f"; ingest alone {dl['ingest_alone_images_per_s']} img/s on {dl['ingest_num_workers']} "
                        f"workers, {_whole(dl['ingest_alone_epochs'])}"
                        if dl.get("ingest_alone_images_per_s") is not None else "")
                     + (f"; ingest alone failed: {dl['ingest_error']}" if "ingest_error" in dl else "")
                     + (f", pipeline/dataloader {r['ingest_pipeline_over_dataloader']:.2f}"
                        if "ingest_pipeline_over_dataloader" in r else "") + ")")
    elif dl:
        same = p is not None and p.get("skipped") == dl["skipped"]
        lines.append(f"  dataloader  {'skipped: as the pipeline' if same else dl['skipped']}")
    c = r.get("comm")
    if c:
        lines.append(f"  comm      {c['workers']} workers x batch {c['per_worker_batch']} ({c['backend']}):")
        for kind, e in sorted(c["per_step"].items()):
            lines.append(f"    {kind:<24} {e['calls']:>5} calls {e['bytes']:>12,d} B {e['ms']:>9.3f} ms / step")
        lines.append(f"    method total {c['method_bytes_per_step']:,d} B/step vs gradient all-reduce "
                     f"{c['gradient_allreduce_bytes']:,d} B ({c['gradient_allreduce_ms']:.1f} ms): "
                     f"ratio {c['method_over_gradient_bytes']:.2e}")
    return "\n".join(lines)
