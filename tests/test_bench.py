"""python -m rayssl.bench runs in a tiny configuration and its JSON is complete (no timings asserted)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import TEST_BACKBONE, TEST_BACKBONE_SETS
from rayssl.cli import bench
from rayssl.modules.precision import cpu_has_bf16_matmul

TINY = ["--batch-size", "4", "--steps", "1", "--warmup", "1", "--repeats", "2", "--split-steps", "1",
        "--comm-steps", "1", "--comm-batch", "2", "--num-images", "48", "--ingest-seconds", "0.5",
        "--set", "data.crop_sizes=[32,16]", "--set", "data.crop_counts=[2,2]",
        "--set", "swav.num_prototypes=16", "--set", "swav.projection_hidden_dim=32",
        "--set", "swav.projection_dim=16", "--set", "swav.queue_length=8", *TEST_BACKBONE]


def _last_json(capsys) -> tuple[str, dict]:
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_bench_reports_step_pipeline_and_comm_with_device_augmentation(ray_session, capsys, listings):
    assert bench.main([*TINY, "--augment-on", "device"]) == 0
    assert len(listings) == 1  # the bench's shards, listed once for the pipeline and the DataLoader parts
    text, r = _last_json(capsys)
    for key in ("method", "preset", "device", "device_name", "dtype", "batch_size", "workers", "cpus", "backbone",
                "crops", "repeats", "num_prototypes", "queue_length"):
        assert key in r, key
    assert r["device"] == "cpu" and r["preset"] == "cpu"
    assert r["dtype"] == ("bf16 autocast" if cpu_has_bf16_matmul() else "fp32")  # run.precision=auto
    assert r["channels_last"] == cpu_has_bf16_matmul()
    assert r["batch_size"] == 4 and r["crops"] == ["2x32", "2x16"] and r["repeats"] == 2

    s = r["step"]
    for key in ("images_per_s", "ms_per_step", "backbone_ms", "heads_ms", "loss_ms", "optimizer_ms",
                "sinkhorn_ms", "peak_memory_mb", "peak_memory_kind"):
        assert isinstance(s[key], (int, float, str)), key
    assert set(s["stage_ms"]) == {"backbone_fwd_bwd", "backbone_heads_fwd_bwd", "full_fwd_bwd", "optimizer_step"}
    assert len(s["runs_images_per_s"]) == 2 and s["images_per_s"] > 0 and s["peak_memory_mb"] > 0

    p = r["pipeline"]
    assert p["augment_on"] == "device" and p["images_per_s"] > 0 and len(p["runs_images_per_s"]) == 2
    assert abs(p["ratio"] - p["images_per_s"] / s["images_per_s"]) <= 0.01 * p["ratio"] + 1e-3
    assert p["ingest_alone_images_per_s"] >= 0 and p["ray_cpus"] >= 1  # a rate, not asserted
    assert "ingest_error" not in p  # the ingest bench also drains shipped bytes
    # The pipeline really read the bench's JPEG shards (48 images listed and counted).
    assert p["images_listed"] == 48 and p["data_counts"]["seen"] >= 4

    # The same step fed by a torch DataLoader over the same shards: the baseline a user would write.
    dl = r["dataloader"]
    assert dl["images_per_s"] > 0 and len(dl["runs_images_per_s"]) == 2 and dl["num_workers"] >= 1
    assert abs(r["pipeline_over_dataloader"] - p["images_per_s"] / dl["images_per_s"]) <= 0.01 * r["pipeline_over_dataloader"]
    assert dl["data"] == p["data"] and not dl["pin_memory"]
    # Its ingest alone too, one worker per core; no ratio to Ray Data's here, which ships bytes.
    assert dl["ingest_alone_images_per_s"] > 0 and dl["ingest_num_workers"] == os.cpu_count()
    assert dl["ingest_alone_epochs"] >= 0 and p["ingest_alone_epochs"] >= 0  # each epoch's start is in the figure
    assert "ingest_pipeline_over_dataloader" not in r

    c = r["comm"]
    assert c["workers"] == 2 and c["per_worker_batch"] == 2
    sink = c["per_step"]["sinkhorn_marginals"]
    # One stacked call for the two code crops: their maxes, the batch size with their totals,
    # 3 row sums of 2 x K=16 floats, the finiteness flag.
    assert sink["calls"] == 6
    assert sink["bytes"] == 4 * (2 + 3 + 3 * 2 * 16 + 1)
    assert c["method_bytes_per_step"] == sink["bytes"]  # SwAV's queue is per worker: no gather
    assert c["gradient_allreduce_bytes"] > 1_000_000 and 0 < c["method_over_gradient_bytes"] < 1e-3
    for line in ("step", "pipeline", "dataloader", "comm", "sinkhorn_marginals"):
        assert line in text  # the readable table precedes the JSON


def test_ingest_alone_reports_the_pipeline_and_the_dataloader_on_the_same_files(ray_session, tmp_path, capsys,
                                                                                 listings):
    """``--only ingest``: the samples/s out of Ray Data's pipeline and out of the DataLoader
    baseline alone, on the same shards and crops, and their ratio; a source the DataLoader does
    not read (Parquet) is named in its place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import make_tar
    from rayssl.bench.config import ingest_config
    from rayssl.bench.dataloader import measure_dataloader_ingest
    from rayssl.bench.pipeline import write_jpeg_shards

    shards = write_jpeg_shards(str(tmp_path / "shards"), 64, 48)
    assert bench.main(["--only", "ingest", "--data", shards, "--ingest-seconds", "0.5", "--batch-size", "8",
                       "--set", "data.crop_sizes=[32,16]", "--set", "data.crop_counts=[2,2]"]) == 0
    assert listings == [shards]  # checked before Ray starts, and that listing read by both feeds
    text, r = _last_json(capsys)
    i, dl = r["ingest"], r["dataloader_ingest"]
    assert i["kind"] == "webdataset" and i["images_listed"] == 64 and i["crops"] == ["2x32", "2x16"]
    assert i["samples_per_s"] > 0 and dl["samples_per_s"] > 0 and dl["samples"] > 0
    assert dl["num_workers"] == os.cpu_count() and dl["seconds"] >= 0.5
    # The same key as the full bench's ratio of the two ingests alone (no step-fed ratio here).
    assert r["ingest_pipeline_over_dataloader"] == pytest.approx(i["samples_per_s"] / dl["samples_per_s"], rel=0.01)
    assert "pipeline_over_dataloader" not in r
    # Each feed counts the epochs it read to the end (their starts are in its figure): the images it
    # handed over, the first batch of 8 included, are those epochs' and at most one more's.
    for feed in (i, dl):
        assert feed["epochs_completed"] * 64 <= feed["samples"] + 8 <= (feed["epochs_completed"] + 1) * 64, feed
    assert f"({i['epochs_completed']} whole epoch{'' if i['epochs_completed'] == 1 else 's'} of 64 images)" in text
    assert f"dataloader  {dl['samples_per_s']:.1f} samples/s over {dl['seconds']} s ({dl['epochs_completed']} whole ep" in text

    pq.write_table(pa.table({"image": [b"not read"]}), str(tmp_path / "images.parquet"))
    cfg = ingest_config({"source": str(tmp_path / "images.parquet")}, "quick", 8)
    assert measure_dataloader_ingest(cfg, 0.1) == {
        "skipped": "the DataLoader baseline reads tar shards or image files, not parquet"}
    # Shards with no usable image: said in the JSON, as the pipeline's ingest says its errors.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-000000.tar").write_bytes(make_tar([("0.jpg", b"\xff\xd8\xff not a JPEG")]))
    cfg = ingest_config({"source": str(tmp_path / "bad")}, "quick", 8)
    assert measure_dataloader_ingest(cfg, 0.1, num_workers=0) == {
        "error": "RuntimeError: the DataLoader produced no images", "num_workers": 0}


def test_bench_measures_the_queue_all_gather_of_moco(capsys):
    assert bench.main(["--method", "moco", "--skip", "step", "--skip", "pipeline", "--skip", "dataloader",
                       "--comm-steps", "1",
                       "--comm-batch", "2", "--set", "data.crop_sizes=[16]",
                       "--set", "moco.projection_hidden_dim=32", "--set", "moco.projection_dim=8",
                       "--set", "moco.queue_size=64"]) == 0
    _, r = _last_json(capsys)
    assert "step" not in r and "pipeline" not in r and "dataloader" not in r
    per = r["comm"]["per_step"]
    # 2 workers x 2 keys x (512 backbone + 8 projection) float32, gathered from both workers.
    assert per["queue_keys_all_gather"]["bytes"] == 2 * 2 * (512 + 8) * 4
    # Shuffled BN moves each key image once, to the worker that encodes it, and its keys back: a
    # worker receives its local batch's worth of each (2 x 3 x 16 x 16 floats, 2 x (512 + 8)),
    # whatever the number of workers, in two all-to-alls.
    assert per["shuffled_bn"] == {**per["shuffled_bn"], "calls": 2, "bytes": 2 * (3 * 16 * 16 + 512 + 8) * 4}


def test_bench_refuses_bad_arguments_with_one_line(capsys):
    assert bench.main(["--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert bench.main(["--only", "step", "--skip", "comm"]) == 2
    assert "--only and --skip: give one of them" in capsys.readouterr().err
    # The one pair allowed: the ingest of Ray Data alone, without the DataLoader's.
    parse = bench.build_parser().parse_args
    alone = bench.options_from(parse(["--only", "ingest", "--skip", "dataloader", "--data", "d"]))
    both = bench.options_from(parse(["--only", "ingest", "--data", "d"]))
    assert alone.parts == both.parts == ("ingest",) and not alone.dataloader_ingest and both.dataloader_ingest
    assert bench.main(["--set", "swav.epsilon=-1", "--skip", "pipeline", "--skip", "comm"]) == 2
    assert "swav.epsilon" in capsys.readouterr().err


def test_the_bench_times_the_step_the_worker_runs(monkeypatch):
    """The step the bench measures is Engine.train_step, the function the Ray worker calls."""
    import torch

    from rayssl.bench.config import bench_config
    from rayssl.bench.step import measure_step
    from rayssl.engine import Engine

    calls = []
    original = Engine.train_step

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "train_step", counted)
    cfg = bench_config("swav", "cpu", 4, TINY[TINY.index("--set"):][1::2])
    out = measure_step(cfg, torch.device("cpu"), steps=2, warmup=1, repeats=2, split_steps=1)
    assert len(calls) == 1 + 2 * 2 and len({id(e) for e in calls}) == 1  # warm-up + 2 runs of 2 steps, one engine
    assert out["plain_images_per_s"] > 0 and len(out["plain_runs_images_per_s"]) == 2  # the baseline, beside it
    assert out["step_over_plain"] == pytest.approx(out["images_per_s"] / out["plain_images_per_s"], rel=0.01)
    assert out["images_per_s"] > 0 and calls[0].step == 10**6 + 5  # past the queue start and prototype freeze


def test_the_dataloader_baseline_cuts_every_image_into_exact_batches_epoch_after_epoch(tmp_path):
    """The baseline reads each image of the shards once per epoch, crops it as Ray Data's tasks do,
    and hands the step exact batches across chunk, shard and epoch boundaries."""
    import io as _io

    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

    from conftest import make_tar
    from rayssl.bench.dataloader import _batches, _Crops
    from rayssl.config import Config
    from rayssl.data.multicrop import crop_spec
    from rayssl.data.pipeline import resolve_data_source

    def png(i):
        buf = _io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), i, dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()
    sizes = [7, 6]  # 13 images in two shards
    for s, n in enumerate(sizes):
        (tmp_path / f"train-{s:06d}.tar").write_bytes(make_tar([(f"{s}_{i:03d}.png", png(10 * s + i)) for i in range(n)]))
    cfg = Config.from_dict({"data": {"source": str(tmp_path), "crop_sizes": [32, 16], "crop_counts": [2, 1]}})
    source = resolve_data_source(cfg.data)
    assert source.kind == "webdataset"
    chunks = list(_Crops(source, crop_spec(cfg.data), 16, seed=0, chunk=4))
    assert [len(c["crop_0"]) for c in chunks] == [4, 3, 4, 2]  # per shard, in chunks of 4
    assert chunks[0]["crop_0"].dtype == np.uint8 and chunks[0]["crop_2"].shape[-3:] in ((3, 16, 16), (16, 16, 3))
    loader = DataLoader(_Crops(source, crop_spec(cfg.data), 16, seed=0, chunk=4), batch_size=None, num_workers=0)
    batches = _batches(loader, 5, ["crop_0", "crop_1", "crop_2"])
    got = [next(batches) for _ in range(6)]  # 30 images: two whole epochs of 13 and 4 of the third
    assert all(len(b) == 3 and all(len(c) == 5 for c in b) for b in got)
    # Batch 3 starts inside the first epoch and ends in the second: its rows are the first epoch's
    # last 3 images and the second epoch's first 2 (the same crops: the epoch is not re-seeded here).
    flat = torch.cat([b[0] for b in got])
    assert torch.equal(flat[13:26], flat[:13]) and torch.equal(flat[26:30], flat[:4])


def test_a_listing_is_made_once_kept_when_given_and_never_made_for_the_scenes(tmp_path, listings):
    """``data_listing``, which the bench's parts call: the built-in scenes have nothing to list, a
    listing the caller holds is used as it is, and a folder is listed when none is held."""
    from rayssl.config import Config
    from rayssl.data.pipeline import data_listing

    (tmp_path / "a.jpg").write_bytes(b"not read by a listing")
    scenes = Config.from_dict({"data": {"source": "scenes"}}).data
    folder = Config.from_dict({"data": {"source": str(tmp_path)}}).data
    assert data_listing(scenes) is None and listings == []
    held = data_listing(folder)
    assert listings == [str(tmp_path)] and held.kind == "images" and len(held.paths) == 1
    assert data_listing(folder, held) is held and listings == [str(tmp_path)]


def test_the_step_and_communication_parts_run_where_ray_is_not_installed(tmp_path):
    """A GPU machine may have torch alone: ``--only step`` and ``--only comm`` import no Ray (the
    child process cannot: ``ray`` is blocked in its module table, as if not installed)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None\n"
            "from rayssl.cli import bench\n"
            f"sys.exit(bench.main({[*TINY, '--skip', 'pipeline', '--skip', 'dataloader']!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["step"]["images_per_s"] > 0 and r["comm"] and "pipeline" not in r and "dataloader" not in r


def test_the_steps_waits_for_the_device_are_counted_from_cudas_sync_warnings(monkeypatch):
    """``count_syncs`` counts the warnings CUDA's sync debug mode gives at each synchronising call
    (torch's own text), nothing else, and puts the mode back, also when the step raises. CUDA's
    switch is faked here (no GPU); off CUDA nothing is counted and the step is not run."""
    import warnings

    import torch

    from rayssl.bench.step import count_syncs

    modes = [0]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))

    def step(syncs: int, fail: bool = False):
        assert modes[-1] == "warn"
        for _ in range(syncs):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)  # as torch words it
        warnings.warn("an unrelated warning", UserWarning)
        if fail:
            raise RuntimeError("the step failed")

    cuda = torch.device("cuda")
    assert count_syncs(lambda: step(3), cuda) == 3 and count_syncs(lambda: step(0), cuda) == 0
    assert modes[-1] == 0
    with pytest.raises(RuntimeError, match="the step failed"):
        count_syncs(lambda: step(2, fail=True), cuda)
    assert modes[-1] == 0
    ran = []
    assert count_syncs(lambda: ran.append(1), torch.device("cpu")) is None and ran == []


def test_a_method_with_batch_columns_is_benched_with_them_on_the_host(tmp_path):
    """CDUL's bench step gets a batch of distinct image indices on the host (as the worker's feed
    hands them over), and its label update moves exactly those images' labels."""
    import numpy as np
    import torch

    from rayssl.bench.config import bench_config
    from rayssl.bench.step import StepBench
    from rayssl.data.pseudo_labels import read_meta, scenes_source, write_soft_labels

    rows, batch = 40, 8
    soft = np.random.default_rng(1).uniform(0.1, 0.9, (rows, 5)).astype(np.float32)
    labels = write_soft_labels(str(tmp_path / "labels"), list("abcde"), soft, scenes_source(0, 32, rows))
    with pytest.raises(FileExistsError, match="already holds pseudo-labels"):  # a table there is kept
        write_soft_labels(labels, ["x"], soft[:1], scenes_source(0, 32, 1))
    assert read_meta(labels)["classes"] == list("abcde")
    cfg = bench_config("cdul", "cpu", batch, ["data.crop_sizes=[32]", f"cdul.pseudo_labels={labels}",
                                              *TEST_BACKBONE_SETS])
    sb = StepBench(cfg, torch.device("cpu"))
    index = sb.columns["index"]
    assert set(sb.columns) == {"index"} and index.device.type == "cpu" and index.dtype == torch.int64
    assert len(index) == batch == len(set(index.tolist())) and 0 <= index.min() and index.max() < rows
    before = sb.method.store.latent.clone()
    sb.step()  # an update epoch (the bench steps far past CDUL's warm-up)
    moved = torch.nonzero((sb.method.store.latent != before).any(1)).reshape(-1)
    assert sorted(moved.tolist()) == sorted(index.tolist())
    with pytest.raises(ValueError, match="needs a label table of as many rows"):
        sb.method.example_columns(rows + 1, torch.Generator())


def test_bench_measures_cduls_step_and_label_gathers_and_says_why_its_pipeline_is_not_benched(tmp_path, capsys):
    """CDUL trains on the images its labels table lists, by index: the bench times its step and its
    label-update all-gathers, and says why its pipeline parts (the bench's own shards) do not apply."""
    import numpy as np

    from rayssl.data.pseudo_labels import scenes_source, write_soft_labels

    soft = np.random.default_rng(2).random((64, 4), dtype=np.float32)
    labels = write_soft_labels(str(tmp_path / "labels"), list("abcd"), soft, scenes_source(0, 32, 64))
    assert bench.main(["--method", "cdul", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--repeats", "1",
                       "--split-steps", "1", "--comm-steps", "1", "--comm-batch", "2",
                       "--set", f"cdul.pseudo_labels={labels}", "--set", "data.crop_sizes=[32]", *TEST_BACKBONE]) == 0
    text, r = _last_json(capsys)
    assert r["method"] == "cdul" and r["step"]["images_per_s"] > 0 and r["step"]["plain_images_per_s"] > 0
    for part in ("pipeline", "dataloader"):
        assert set(r[part]) == {"skipped"} and f"trains on the images {labels} lists" in r[part]["skipped"]
    assert "pipeline  skipped: --method cdul" in text and "pipeline_over_dataloader" not in r
    table = text.strip().rsplit("\n", 1)[0]  # the readable lines, before the JSON
    assert "dataloader  skipped: as the pipeline" in table and table.count(f"trains on the images {labels}") == 1
    # Each update gathers every worker's indices (int64) and new latent labels (4 classes, float32).
    gathers = r["comm"]["per_step"]["label_updates_all_gather"]
    assert gathers["calls"] == 2 and gathers["bytes"] == 2 * (2 * 8 + 2 * 4 * 4)
    assert r["comm"]["method_bytes_per_step"] == gathers["bytes"]
