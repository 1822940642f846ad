"""Evaluation during a run on the user's own labelled images (``--eval-data``), not on scenes.

A run on a folder of images with a labelled ImageFolder evaluation split reports the kNN top-1
of that split, equal to ``rayssl eval`` on the run's checkpoint, an unreadable evaluation image
skipped and counted; a run on the user's data without one evaluates nothing and says so; a
sweep without one is refused before anything starts; bad evaluation options name themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_args
from rayssl.checkpoint import load_shared_state
from rayssl.cli import eval as eval_cli
from rayssl.cli import sweep as sweep_cli
from rayssl.cli import train as train_cli
from rayssl.data.scenes import write_image_folder
from rayssl.presets import layered_config
from rayssl.runtime.evaluation import no_evaluation_note


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-data")
    train = write_image_folder(root / "unlabelled", 128, seed=3, size=48, fmt="jpg", split="train")
    split = write_image_folder(root / "labelled", 60, seed=3, size=48, fmt="jpg", layout="imagefolder", split="eval-train")
    broken = next(p for p in sorted(split.iterdir()) if p.is_dir())
    (broken / "scene-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return train, split


def test_a_run_scores_the_users_split_as_rayssl_eval_scores_its_checkpoint(ray_session, folders, tmp_path, capsys):
    """Two epochs, evaluated after each: epoch 1's evaluation ran in a Ray task while epoch 2
    trained (its score came with epoch 2's report, into epoch 1's row), epoch 2's on rank 0 at the
    end; each equals ``rayssl eval`` on that epoch's checkpoint. The run trains in-process
    (``--num-workers 0``): the evaluation is the subject, and rank 0 runs the same training
    function there as on a Ray Train worker, without the 20 s of starting a worker group here."""
    train, split = folders
    out = tmp_path / "run"
    rc = train_cli.main(tiny_args(out, "--data", str(train), "--preset", "quick", "--epochs", "2",
                                  "--eval-data", str(split), "--set", "eval.every_epochs=1",
                                  "--set", "eval.random_baseline=true", "--set", "run.checkpoint_every_epochs=1",
                                  "--set", "eval.where=beside",
                                  "--set", "eval.online_probe=true", "--num-workers", "0"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    s = _last_json(captured.out)
    assert s["metric"] == "knn_top1" and s["eval_data"] == str(split) and 0 <= s["knn_top1"] <= 1
    assert f"epoch 1: evaluating on {split} in a Ray task beside training" in captured.err
    assert f"epoch 1: knn_top1 on {split}" in captured.err and "1 unreadable skipped" in captured.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = (r for r in rows if r.get("kind") != "step")
    assert first["epoch"] == 1 and first["reported_epoch"] == 2  # not waited for: training went on
    assert last["knn_top1"] == s["knn_top1"] and last["eval_skipped_images"] == 1 and "reported_epoch" not in last
    assert last["eval_images"] == first["eval_images"] == 60  # 48 train + 12 test, the broken one not among them
    assert first["knn_top1_random_init"] == last["knn_top1_random_init"] == s["knn_top1_random_init"]  # once
    # The online probe trained on the same split's 48 training images and scored its 12 test images.
    assert "online probe: a linear head on 48 labelled images, scored on 12 every epoch (probe_top1)" in captured.err
    assert last["probe_top1"] == s["probe_top1"] and s["probe_top1"] * 12 == pytest.approx(round(s["probe_top1"] * 12))

    checkpoints = {load_shared_state(d)["epoch"]: d for d in out.glob("checkpoint_*") if d.is_dir()}
    for row in (first, last):
        assert eval_cli.main(["--checkpoint", str(checkpoints[row["epoch"]]), "--data", str(split),
                              "--protocol", "knn"]) == 0
        e = _last_json(capsys.readouterr().out)
        assert e["skipped_images"] == 1 and e["num_train"] + e["num_test"] == 60
        assert abs(e["knn_top1"] - row["knn_top1"]) <= 1 / e["num_test"] + 1e-9  # within one image


def test_without_an_evaluation_source_a_run_on_user_data_evaluates_nothing_and_says_so():
    on_scenes = layered_config({})
    assert no_evaluation_note(on_scenes) is None
    on_folder = layered_config({"data": {"source": "/data/photos"}})
    note = no_evaluation_note(on_folder)
    assert "no evaluation during this run" in note and "--eval-data" in note and "/data/photos" in note
    assert no_evaluation_note(layered_config({"data": {"source": "/data/photos"}, "eval": {"data": "/data/val"}})) is None


def test_a_sweep_on_user_data_without_an_evaluation_source_is_refused(folders, tmp_path, capsys):
    train, _ = folders
    rc = sweep_cli.main(["--data", str(train), "--output", str(tmp_path / "sweep"), "--num-samples", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--eval-data" in err and "ranks and stops trials" in err
    assert not (tmp_path / "sweep").exists()  # nothing started, nothing written


@pytest.mark.parametrize("extra,message", [
    (["--eval-labels", "labels.csv"], "--eval-labels (eval.labels): needs eval.data (--eval-data)"),
    (["--eval-data", "/nonexistent/labelled"], "--eval-data"),
    (["--set", "eval.protocol=svm"], "eval.protocol: choose auto, knn, linear or multilabel-linear"),
    (["--set", "eval.online_probe=true"], "eval.online_probe: needs labelled images: add --eval-data"),
    (["--set", "eval.where=gpu"], "eval.where: choose auto, beside or rank0, got 'gpu'"),
])
def test_bad_evaluation_options_are_refused_naming_them(folders, tmp_path, capsys, extra, message):
    train, _ = folders
    assert train_cli.main(["--data", str(train), "--output", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not Path(tmp_path / "r").exists()


def test_a_sweep_on_user_data_ranks_by_the_evaluation_on_it(folders, tmp_path):
    """The trials' config carries the evaluation source with its protocol resolved from the
    labels, and the metric Tune ranks and stops trials by is that protocol's."""
    from rayssl.eval.evaluate import run_metric
    from rayssl.methods import get_method

    train, split = folders
    _, cfg, base, _, _ = sweep_cli.prepare_sweep(["--data", str(train), "--eval-data", str(split), "--output",
                                                  str(tmp_path / "sweep"), "--set", "eval.protocol=auto"])
    assert base["eval"]["data"] == str(split) and base["eval"]["protocol"] == "knn"  # one class per image
    assert run_metric(cfg.eval, get_method("swav").metric) == "knn_top1" and cfg.eval.every_epochs == 1
    multi = layered_config({"data": {"source": str(train)}, "eval": {"data": str(split), "protocol": "multilabel-linear"}})
    assert run_metric(multi.eval, "knn_top1") == "linear_map"


def test_the_users_data_is_evaluated_every_eval_every_epochs_and_at_the_end():
    from types import SimpleNamespace

    from rayssl.runtime.evaluation import UserDataEvaluation

    cfg = layered_config({"data": {"source": "/data/photos"}, "run": {"epochs": 5},
                          "eval": {"data": "/data/val", "every_epochs": 2, "num_test_images": 0}})
    due = UserDataEvaluation(SimpleNamespace(cfg=cfg)).due
    assert [due(e) for e in range(5)] == [False, True, False, True, True]  # scenes' num_test_images plays no part
    cfg.eval.every_epochs = 0
    assert [due(e) for e in range(5)] == [False, False, False, False, True]


@pytest.mark.parametrize("where,device,beside", [("auto", "cpu", False), ("auto", "cuda", True),
                                                  ("beside", "cpu", True), ("rank0", "cuda", False)])
def test_the_evaluation_runs_beside_training_on_gpus_and_on_rank_0_on_cpus(where, device, beside):
    """On CPUs training keeps every core busy, so a task beside it only slows the steps (measured:
    docs/evaluation.md); on GPUs the node's CPUs are free for it."""
    import torch
    from types import SimpleNamespace

    from rayssl.runtime.evaluation import BackgroundEvaluation, evaluator_for

    cfg = layered_config({"data": {"source": "/data/photos"}, "eval": {"data": "/data/val", "where": where}})
    chosen = evaluator_for(SimpleNamespace(cfg=cfg, device=torch.device(device)))
    assert isinstance(chosen, BackgroundEvaluation) == beside
