"""Pictures: curves + trackers from per-epoch reports, SwAV prototype usage, MLS positives, CDUL labels."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoints import write_random_checkpoint
from rayssl.viz import figures
from rayssl.cli import viz as viz_cli
from rayssl.viz.models import mls_positives
from rayssl.runtime.callbacks import RunTracker
from rayssl.viz.pictures import sample_images
from rayssl.viz.tracking import TRACKERS_FILE, RunRecorder, read_history, read_steps, tracking_requirements
from wandb_records import offline_runs


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _tensorboard_scalars(directory) -> dict[tuple[str, int], float]:
    """Parse TFRecord-framed Event protos (length, crc, data, crc) without TensorBoard."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for f in directory.glob("events.out.tfevents.*"):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out[(v.tag, ev.step)] = v.simple_value
    return out


def test_tracker_writes_history_curves_and_tensorboard_and_keeps_earlier_epochs_on_resume(tmp_path):
    reports = [{"epoch": e, "step": 4 * e, "loss": 5.0 - e, "lr": 0.1 / e, "images_per_s": 10.0 * e,
                "data": {"seen": 3}} for e in (1, 2, 3)]
    reports[2]["knn_top1"] = 0.5
    reports[2]["knn_top1_random_init"] = 0.1
    tracker = RunTracker(RunRecorder(str(tmp_path), "knn_top1", title="t", tensorboard=""))
    for r in reports:
        tracker.after_report(None, [r, {"epoch": r["epoch"], "loss": -1.0}], None)  # rank 0's report counts
    history = read_history(str(tmp_path))
    assert [h["epoch"] for h in history] == [1, 2, 3] and "data" not in history[0]
    assert history[1]["loss"] == 3.0 and history[2]["knn_top1"] == 0.5
    _png(tmp_path / "curves.png")
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars[("train/loss", 2)] == pytest.approx(3.0)
    assert scalars[("train/lr", 3)] == pytest.approx(0.1 / 3)
    assert scalars[("train/knn_top1", 3)] == pytest.approx(0.5)
    # A resumed run reports epoch 2 again (from the epoch-1 checkpoint): epoch 3 is replaced.
    resumed = RunTracker(RunRecorder(str(tmp_path), "knn_top1"))
    resumed.after_report(None, [{"epoch": 2, "loss": 2.5, "lr": 0.05, "images_per_s": 20.0}], None)
    assert [(h["epoch"], h["loss"]) for h in read_history(str(tmp_path))] == [(1, 4.0), (2, 2.5)]


def _steps_and_epoch(recorder: RunRecorder, steps, epoch: int, loss0: float) -> None:
    """What rank 0 reports in an epoch: a row per log step, then the epoch's report."""
    for s in steps:
        recorder.record({"step_log": {"step": s, "epoch": s / 4, "loss": loss0 - s / 10, "lr": 0.1,
                                      "images_per_s": 50.0, "data_wait_pct": 3.0}})
    recorder.record({"epoch": epoch, "step": 4 * epoch, "loss": loss0 - 0.4 * epoch, "lr": 0.1})


def test_step_rows_reach_every_tracker_and_a_resume_continues_the_wandb_run(tmp_path, monkeypatch):
    """Per-log-step rows go to metrics.jsonl (``kind: step``), TensorBoard (``step/<key>`` at the
    step) and W&B (offline, as a user without network runs it); the W&B run id is kept in
    trackers.json, and a resumed run (a new recorder, as a --resume makes) logs to the same W&B
    run and replaces the rows of the steps it trains again."""
    monkeypatch.chdir(tmp_path)  # anything W&B writes beside the run stays in the test's folder
    out = tmp_path / "run"
    first = RunRecorder(str(out), "knn_top1", tensorboard="", wandb="rayssl-test", run_name="run", params={"method": "swav"}, epochs=3)
    _steps_and_epoch(first, (2, 4), 1, 5.0)
    _steps_and_epoch(first, (6, 8), 2, 5.0)
    first.record({"step_log": {"step": 10, "epoch": 2.5, "loss": 3.0, "lr": 0.1}})  # then the run dies
    first.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("kind"), r["step"]) for r in rows] == [
        ("step", 2), ("step", 4), (None, 4), ("step", 6), ("step", 8), (None, 8)]  # step 10: not yet flushed
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert scalars[("step/loss", 6)] == pytest.approx(4.4) and scalars[("train/loss", 2)] == pytest.approx(4.2)
    run_id = json.loads((out / TRACKERS_FILE).read_text())["wandb"]["id"]

    resumed = RunRecorder(str(out), "knn_top1", wandb="rayssl-test", epochs=3)
    _steps_and_epoch(resumed, (6, 8), 2, 4.0)  # resumed from the epoch-1 checkpoint
    _steps_and_epoch(resumed, (10, 12), 3, 4.0)
    assert [(s["step"], s["loss"]) for s in read_steps(str(out))] == [
        (2, 4.8), (4, 4.6), (6, 3.4), (8, 3.2), (10, 3.0), (12, 2.8)]
    assert [(h["epoch"], h["loss"]) for h in read_history(str(out))] == [(1, 4.6), (2, 3.2), (3, 2.8)]
    runs = offline_runs(out)
    assert [r["id"] for r in runs] == [run_id, run_id] and {r["project"] for r in runs} == {"rayssl-test"}
    logged = {(h["_step"], h["step/loss"]) for r in runs for h in r["history"] if "step/loss" in h}
    assert {(2, 4.8), (4, 4.6), (10, 3.0), (12, 2.8)} <= logged
    assert any(h.get("epoch/loss") == pytest.approx(2.8) and h["epoch"] == 3 for h in runs[1]["history"])
    assert json.loads((out / TRACKERS_FILE).read_text())["wandb"]["id"] == run_id


def test_an_evaluation_that_ran_beside_training_joins_its_own_epoch(tmp_path, monkeypatch):
    """Epoch 1's score, brought by epoch 2's report (``late_evaluations``), lands in epoch 1's row,
    at epoch 1 in TensorBoard, and in W&B against ``epoch`` 1 (the row after the report's step)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rec = RunRecorder(str(out), "knn_top1", tensorboard="", wandb="rayssl-test", epochs=2)
    rec.record({"epoch": 1, "step": 4, "loss": 4.0})
    rec.record({"epoch": 2, "step": 8, "loss": 3.0, "knn_top1": 0.75,
                "late_evaluations": [{"epoch": 1, "knn_top1": 0.5, "eval_data": "/val", "reported_epoch": 2}]})
    history = read_history(str(out))
    assert [(h["epoch"], h.get("knn_top1"), h.get("reported_epoch")) for h in history] == [(1, 0.5, 2), (2, 0.75, None)]
    assert "late_evaluations" not in history[1]
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert scalars[("train/knn_top1", 1)] == pytest.approx(0.5) and scalars[("train/knn_top1", 2)] == pytest.approx(0.75)
    (run,) = offline_runs(out)
    logged = [(h["_step"], h["epoch"], h["epoch/knn_top1"]) for h in run["history"] if "epoch/knn_top1" in h]
    assert sorted(logged) == [(8, 2, 0.75), (9, 1, 0.5)]


def test_wandb_flag_needs_a_project_name(tmp_path):
    with pytest.raises(ValueError, match=r"^--wandb: give a W&B project name"):
        tracking_requirements(None, None, str(tmp_path), wandb="team/project")


def test_curves_sort_epochs_latest_duplicate_wins_and_missing_metric_is_labelled(tmp_path):
    history = [{"epoch": 2, "loss": 2.0, "lr": 0.2, "images_per_s": 5.0},
               {"epoch": 1, "loss": 3.0, "lr": 0.1, "images_per_s": float("nan")},
               {"epoch": 2, "loss": 1.5, "lr": 0.2, "images_per_s": 6.0}]
    series = figures.plot_training_curves(history, str(tmp_path / "c.png"), metric="linear_map")
    assert series["loss"] == [(1.0, 3.0), (2.0, 1.5)]
    assert series["images_per_s"] == [(2.0, 6.0)]  # the NaN is not drawn
    assert series["linear_map"] == [] and "probe_top1" not in series  # no probe: no probe panel
    _png(tmp_path / "c.png")
    history[2]["probe_top1"] = 0.4  # eval.online_probe's score gets its own panel beside the metric
    series = figures.plot_training_curves(history, str(tmp_path / "c.png"), metric="knn_top1")
    assert series["probe_top1"] == [(2.0, 0.4)] and "probe_map" not in series
    with pytest.raises(ValueError, match="without 'epoch'"):
        figures.plot_training_curves([{"loss": 1.0}], str(tmp_path / "d.png"))


def test_mlflow_requested_but_missing_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ValueError, match=r"^--mlflow: mlflow is not installed"):
        tracking_requirements(None, "", str(tmp_path))
    from rayssl.cli import train

    assert train.main(["--output", str(tmp_path / "run"), "--mlflow"]) == 2
    assert "--mlflow: mlflow is not installed" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()
    with pytest.raises(ValueError, match="--tensorboard: --output s3://b/run is remote"):
        tracking_requirements("", None, "s3://b/run")


def test_prototype_usage_numbers():
    counts = figures.prototype_usage(np.array([0, 0, 3, 3, 3, 1]), 5)
    assert counts.tolist() == [2, 1, 0, 3, 0]
    with pytest.raises(ValueError):
        figures.prototype_usage(np.array([5]), 5)


def test_prototype_usage_plot_reports_collapse(tmp_path):
    balanced = figures.plot_prototype_usage(np.array([4, 4, 4, 4]), str(tmp_path / "b.png"))
    assert balanced == {"used": 4, "total": 4, "effective": pytest.approx(4.0), "largest_share": 0.25}
    collapsed = figures.plot_prototype_usage(np.array([0, 12, 0, 0]), str(tmp_path / "c.png"))
    assert collapsed["used"] == 1 and collapsed["effective"] == pytest.approx(1.0)
    p = np.array([6, 3, 3, 0]) / 12
    half = figures.plot_prototype_usage(np.array([6, 3, 3, 0]), str(tmp_path / "h.png"))
    assert half["effective"] == pytest.approx(math.exp(-(p[:3] * np.log(p[:3])).sum()))
    _png(tmp_path / "c.png")


def test_prototypes_cli_counts_match_the_swav_scores(tmp_path, capsys):
    model = write_random_checkpoint(tmp_path / "ckpt", "swav", crop_size=32, num_prototypes=16,
                                    projection_hidden_dim=32, projection_dim=16)
    out = tmp_path / "protos.png"
    assert viz_cli.main(["prototypes", "--checkpoint", str(tmp_path / "ckpt"), "--num-images", "64",
                         "--out", str(out)]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _png(out)
    images, _ = sample_images("scenes", 64, 32, 64, 0, None)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        z = F.normalize(model.projector(model.backbone(x)), dim=1)
        scores = z @ F.normalize(model.prototypes.layer.weight, dim=1).T
    counts = np.bincount(scores.argmax(1).numpy(), minlength=16)
    p = counts[counts > 0] / 64
    assert reported["images"] == 64 and reported["used"] == int((counts > 0).sum())
    assert reported["effective"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert reported["largest_share"] == pytest.approx(counts.max() / 64)
    # an existing --out is not overwritten
    assert viz_cli.main(["prototypes", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_mls_positives_are_top_k_of_online_vs_momentum_backbone_features(tmp_path):
    model = write_random_checkpoint(tmp_path / "ckpt", "mls", crop_size=32, queue_size=64,
                                    projection_hidden_dim=32, projection_dim=16, k=4)
    images, labels = sample_images("scenes", 3 + 40, 32, 64, 0, None)
    idx, sims = mls_positives(model, images[:3], images[3:], k=4)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        g1 = F.normalize(model.backbone(x[:3]), dim=1)
        qg = F.normalize(model.momentum_backbone(x[3:]), dim=1)
    ref = (g1 @ qg.T).numpy()
    assert np.allclose(sims, np.sort(ref, axis=1)[:, ::-1][:, :4], atol=1e-5)
    assert np.allclose(np.take_along_axis(ref, idx, 1), sims, atol=1e-5)
    out = tmp_path / "grid.png"
    stats = figures.plot_positives_grid(images[:3], images[3:], idx, sims, str(out), labels[:3], labels[3:])
    shared = np.mean([bool(labels[r] & labels[3 + idx[r, j]]) for r in range(3) for j in range(4)])
    assert stats == {"k": 4, "queries": 3, "shared_class_fraction": pytest.approx(shared)}
    w, h = _png(out)
    assert w > h  # 5 columns, 3 rows
    assert viz_cli.main(["mls-positives", "--checkpoint", str(tmp_path / "ckpt"), "--queries", "2",
                         "--gallery", "16", "--k", "3", "--out", str(tmp_path / "cli.png")]) == 0
    _png(tmp_path / "cli.png")
    with pytest.raises(ValueError, match="must lie in"):
        figures.plot_positives_grid(images[:1], images[1:3], np.array([[2]]), np.array([[0.5]]), str(tmp_path / "x.png"))


def test_cdul_before_after_plot_on_synthetic_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 24, 24, 3), dtype=np.uint8)
    names = ["cat", "dog", "car", "tree", "boat"]
    before = rng.random((4, 5))
    after = before.copy()
    after[1] = before[1][::-1]  # row 1: a different top label unless the reversal keeps it
    after[3, np.argmin(before[3])] = 2.0  # row 3: a new top label
    truth = (rng.random((4, 5)) > 0.5).astype(int)
    out = tmp_path / "cdul.png"
    res = figures.plot_cdul_labels(images, before, after, names, str(out), top=2, truth=truth)
    for r in range(4):
        assert [n for n, _ in res["before"][r]] == [names[c] for c in np.argsort(-before[r])[:2]]
        assert [n for n, _ in res["after"][r]] == [names[c] for c in np.argsort(-after[r])[:2]]
    expected_changed = [r for r in range(4) if np.argmax(before[r]) != np.argmax(after[r])]
    assert res["changed"] == expected_changed and 3 in expected_changed
    _png(out)
    with pytest.raises(ValueError, match="before and after must be"):
        figures.plot_cdul_labels(images, before[:, :4], after, names, str(tmp_path / "bad.png"))
    assert not (tmp_path / "bad.png").exists()
