"""End to end on Ray: 2 TorchTrainer workers fed by Ray Data, then --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_args
from rayssl import train
from rayssl.checkpoint import load_rank_state, load_shared_state, verify_checkpoint_dir


def _summary(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])  # the contract: the last stdout line is the JSON summary


def test_two_workers_then_resume_continues_the_step_counter(ray_session, tmp_path, capsys):
    out = tmp_path / "swav"
    assert train.main(tiny_args(out, "--epochs", "1", "--set", "swav.queue_length=64",
                                "--set", "swav.queue_start_epoch=0")) == 0
    s1 = _summary(capsys)
    steps_per_epoch = 128 // 32
    assert s1["method"] == "swav" and s1["epochs"] == 1 and s1["steps"] == steps_per_epoch
    assert s1["images_seen"] == 128 and s1["images_per_s"] > 0
    assert 0.0 <= s1["knn_top1"] <= 1.0 and s1["final_loss"] > 0
    assert s1["data"]["seen"] >= 128
    ckpt = Path(s1["checkpoint"])
    manifest = verify_checkpoint_dir(ckpt)
    assert manifest["world_size"] == 2 and manifest["step"] == steps_per_epoch
    shared = load_shared_state(ckpt)
    assert shared["epoch"] == 1 and shared["config"]["run"]["num_workers"] == 2
    # Per-worker queues (64 / 2 workers = 32 rows each) are saved by each rank and differ.
    q0, q1 = (load_rank_state(ckpt, r)["method"]["queue"] for r in (0, 1))
    assert q0["field_0"].shape == (32, 32) and int(q0["filled"]) == 32
    assert not torch.equal(q0["field_0"], q1["field_0"])
    assert json.loads((out / "summary.json").read_text())["checkpoint"] == s1["checkpoint"]

    # Resume with more epochs: the stored config is the base, the step counter continues.
    assert train.main(["--output", str(out), "--resume", "--epochs", "2"]) == 0
    s2 = _summary(capsys)
    assert s2["epochs"] == 2 and s2["steps"] == 2 * steps_per_epoch and s2["images_seen"] == 256
    shared2 = load_shared_state(Path(s2["checkpoint"]))
    assert shared2["step"] == 2 * steps_per_epoch
    # Training went on from the first checkpoint's weights, not from a fresh init.
    w1 = shared["model"]["prototypes.layer.weight"]
    w2 = shared2["model"]["prototypes.layer.weight"]
    assert not torch.equal(w1, w2)


# moco is the same module with lam = 0; its queue restore is checked, with exact loss
# equality, in tests/test_resume_equivalence.py.
@pytest.mark.parametrize("method", ["mls"])
def test_mls_and_moco_two_workers_and_resume_restores_the_queue(ray_session, tmp_path, capsys, method):
    out = tmp_path / method
    args = ["--output", str(out), "--method", method, "--num-workers", "2", "--batch-size", "32",
            "--epochs", "1", "--set", "data.scenes_num_images=128", "--set", "eval.num_train_images=100",
            "--set", "eval.num_test_images=50", "--set", "eval.random_baseline=false",
            "--set", f"{method}.queue_size=64", "--set", f"{method}.projection_hidden_dim=64",
            "--set", f"{method}.projection_dim=32"]
    if method == "mls":
        args += ["--set", "mls.k=5"]
    assert train.main(args) == 0
    s1 = _summary(capsys)
    assert s1["method"] == method and s1["steps"] == 4 and s1["metric"] == "linear_map"
    assert 0.0 < s1["linear_map"] <= 1.0
    ckpt = Path(s1["checkpoint"])
    q0, q1 = (load_rank_state(ckpt, r)["method"]["queue"] for r in (0, 1))
    # The MLS/MoCo queue is global: both workers hold the same keys, Q_g and Q_z aligned.
    assert torch.equal(q0["field_0"], q1["field_0"]) and torch.equal(q0["field_1"], q1["field_1"])
    assert int(q0["filled"]) == 64
    assert train.main(["--output", str(out), "--resume", "--epochs", "2"]) == 0
    s2 = _summary(capsys)
    assert s2["steps"] == 8 and s2["epochs"] == 2
