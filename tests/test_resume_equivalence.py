"""Resume equivalence (issue 8): a run killed after a checkpoint and continued with --resume
matches the uninterrupted run with the same seed, on CPU, for every method.

These runs are also the end-to-end tests of training on Ray (issue 2): 2 TorchTrainer
workers fed by Ray Data on 128 generated scenes, the JSON summary on the last stdout line,
the held-out evaluation, checkpoints with every rank's state, then --resume continuing the
step counter. (Resuming with more --epochs than stored is in tests/test_s3_data.py and
tests/test_pseudolabel_job.py.)

The uninterrupted run trains 2 epochs with a checkpoint after each (2 workers,
``data.deterministic``). Its directory is then copied and the epoch-2 checkpoint's manifest
removed -- what a job killed between the two checkpoints leaves behind -- and ``--resume``
continues from the epoch-1 checkpoint in a fresh trainer (new workers, new Ray Data
executions, a new epoch counter in the data pipeline). Epoch 2 must then be the same: the
loss at the first step after the boundary and at the epoch's last step (as reported), and
the weights, optimiser state and per-worker state (queues, RNG states) at its end. SwAV's run
also checkpoints every 3 steps (issue 25) and resumes from the step-6 checkpoint instead, 2
steps into epoch 2: the rest of the epoch's data is the same rows in the same order, and the
end state is the same.

What makes this hold: the checkpoint restores model, optimiser, counters, per-rank queues
and RNG states; the augmentations are seeded per sample by (seed, epoch, sample key), so they
do not depend on which task or worker cuts them; ``data.deterministic`` makes
``streaming_split`` hand each worker the same rows in the same order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TEST_BACKBONE, write_scene_pseudo_labels
from rayssl.cli import train
from rayssl.runtime.internals import SNAPSHOT_FILE
from rayssl.checkpoint import MANIFEST_FILE, load_rank_state, load_shared_state, verify_checkpoint_dir
from rayssl.methods import get_method, method_names

NUM_IMAGES, BATCH = 128, 32
STEPS_PER_EPOCH = NUM_IMAGES // BATCH

# Small settings per method, with every piece of state a checkpoint must carry switched on
# (SwAV's queue from epoch 0; the MLS/MoCo queue, full -- and MLS's multi-label term on --
# before the boundary). A method added to the registry needs an entry here.
METHOD_ARGS: dict[str, list[str]] = {
    "swav": ["--set", "swav.num_prototypes=32", "--set", "swav.projection_hidden_dim=64",
             "--set", "swav.projection_dim=32", "--set", "swav.queue_length=64",
             "--set", "swav.queue_start_epoch=0"],
    "mls": ["--set", "mls.queue_size=64", "--set", "mls.k=5", "--set", "mls.projection_hidden_dim=64",
            "--set", "mls.projection_dim=32"],
    # Label updates in both epochs (so the store moves before and after the boundary); the
    # pseudo-label table is written by the ``pseudo_labels`` fixture, not by a CLIP job.
    "cdul": ["--set", "cdul.label_warmup_epochs=0", "--set", "cdul.label_lr=2.0"],
}
CLASSES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def pseudo_labels(tmp_path_factory) -> Path:
    """A labelling job's output for the training scenes, with seeded soft labels."""
    import numpy as np

    soft = np.random.default_rng(0).uniform(0.05, 0.95, size=(NUM_IMAGES, len(CLASSES))).astype(np.float32)
    return write_scene_pseudo_labels(tmp_path_factory.mktemp("labels"), CLASSES, soft)


# SwAV's run also checkpoints every 3 steps (steps 3 and 6: inside epochs 1 and 2), and resumes
# from inside epoch 2; the other methods resume from the end of epoch 1.
STEP_CHECKPOINTS = {"swav": 3}


def _args(method: str, out: Path) -> list[str]:
    every = STEP_CHECKPOINTS.get(method)
    steps = ["--checkpoint-every-steps", str(every), "--keep-checkpoints", "4"] if every else []
    return ["--output", str(out), "--method", method, "--num-workers", "2", "--batch-size", str(BATCH),
            "--epochs", "2", "--checkpoint-every", "1", "--keep-checkpoints", "2", *steps,
            "--set", f"data.scenes_num_images={NUM_IMAGES}", "--set", "data.deterministic=true",
            # The method's held-out metric (SwAV kNN, MLS linear probe) on a few scenes.
            "--set", "eval.num_train_images=100", "--set", "eval.num_test_images=50",
            "--set", "eval.random_baseline=false",
            *TEST_BACKBONE, *METHOD_ARGS[method]]  # the state a checkpoint carries is the method's


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _checkpoints(run: Path) -> list[tuple[Path, dict]]:
    snap = json.loads((run / SNAPSHOT_FILE).read_text())
    return [(run / r["checkpoint_dir_name"], r["metrics"]) for r in snap["checkpoint_results"]]


def _by_epoch(run: Path) -> dict[int, tuple[Path, dict]]:
    """The checkpoints written at epoch ends (those inside an epoch are reported without one)."""
    return {m["epoch"]: (path, m) for path, m in _checkpoints(run) if "epoch" in m}


def _assert_same_state(a_dir: Path, b_dir: Path) -> None:
    """The whole state of two checkpoints: weights, optimiser, shared method state, every rank's."""
    a, b = load_shared_state(a_dir), load_shared_state(b_dir)
    assert a["step"] == b["step"]
    _assert_close(a["model"], b["model"], "model")
    _assert_close(a["optimizer"], b["optimizer"], "optimizer")
    _assert_close(a.get("method_state"), b.get("method_state"), "method_state")  # CDUL's label store
    for r in range(2):
        _assert_close(load_rank_state(a_dir, r), load_rank_state(b_dir, r), f"rank_{r}")


def _assert_close(a, b, where: str) -> None:
    """Nested state dicts / lists / tensors equal to float tolerance; everything else exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{where}: max diff {(a - b).abs().max()}"
        else:
            assert torch.equal(a, b), f"{where}: differs"
    elif hasattr(a, "shape"):  # numpy arrays (the numpy RNG state)
        assert (a == b).all(), f"{where}: differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# Methods whose model class another entry already runs: MoCo-v2 is the MLS class with the
# multi-label term off (lam = 0), so its queue, momentum encoder and RNG states are checkpointed
# and restored by the code MLS's run covers (that run has the term on, the larger state).
SAME_CLASS_AS = {"moco": "mls"}


def test_every_registered_method_has_resume_settings():
    """The guarantee covers methods added later: each needs an entry in METHOD_ARGS, or runs
    the very model class of one that has."""
    for name, twin in SAME_CLASS_AS.items():
        assert get_method(name).model_cls is get_method(twin).model_cls and twin in METHOD_ARGS
    assert sorted(method_names()) == sorted([*METHOD_ARGS, *SAME_CLASS_AS]), "add small settings for the missing methods"


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_resumed_run_matches_the_uninterrupted_run(ray_session, tmp_path, capsys, method, request):
    full = tmp_path / "full"
    extra = ["--pseudo-labels", str(request.getfixturevalue("pseudo_labels"))] if method == "cdul" else []
    assert train.main(_args(method, full) + extra) == 0
    captured = capsys.readouterr()
    s_full = _summary(captured.out)
    # The summary (the last stdout line, also summary.json) and the checkpoint it names.
    assert s_full["method"] == method and s_full["epochs"] == 2 and s_full["steps"] == 2 * STEPS_PER_EPOCH
    assert s_full["images_seen"] == 2 * NUM_IMAGES and s_full["images_per_s"] > 0 and s_full["final_loss"] > 0
    assert s_full["data"]["seen"] >= NUM_IMAGES
    assert json.loads((full / "summary.json").read_text())["checkpoint"] == s_full["checkpoint"]
    last = Path(s_full["checkpoint"])
    manifest = verify_checkpoint_dir(last)
    assert manifest["world_size"] == 2 and manifest["step"] == 2 * STEPS_PER_EPOCH
    assert load_shared_state(last)["config"]["run"]["num_workers"] == 2
    if method == "cdul":
        # CDUL reports the classifier's mAP; its per-image label store is shared state, saved
        # once, and every image's labels moved in both epochs (updates on from epoch 0).
        assert s_full["metric"] == "classifier_map" and 0.0 < s_full["classifier_map"] <= 1.0
        store = load_shared_state(last)["method_state"]["label_store"]
        assert store["updates"] == 2 * STEPS_PER_EPOCH
        q0 = q1 = None
    else:
        q0, q1 = (load_rank_state(last, r)["method"]["queue"] for r in (0, 1))
    if method == "swav":
        assert s_full["metric"] == "knn_top1" and 0.0 <= s_full["knn_top1"] <= 1.0
        # SwAV's queue is per worker (64 / 2 workers = 32 rows each): saved by each rank, different.
        assert q0["field_0"].shape == (32, 32) and int(q0["filled"]) == 32
        assert not torch.equal(q0["field_0"], q1["field_0"])
    elif method != "cdul":
        # MLS (and MoCo, its class) reports linear-probe mAP; the queue is global: every worker holds the
        # same full queue of the last 64 keys, Q_g and Q_z aligned.
        assert s_full["metric"] == "linear_map" and 0.0 < s_full["linear_map"] <= 1.0
        assert torch.equal(q0["field_0"], q1["field_0"]) and torch.equal(q0["field_1"], q1["field_1"])
        assert int(q0["filled"]) == 64

    # The epoch's time blocked on the input pipeline, the wait for its first batch included.
    full_metrics = _by_epoch(full)[2][1]
    epoch_s = NUM_IMAGES / full_metrics["images_per_s"]
    assert 0 < full_metrics["first_batch_s"] <= full_metrics["data_wait_s"] < epoch_s
    if method in STEP_CHECKPOINTS:  # (its resume from an epoch's end is the other methods')
        _resume_inside_an_epoch(full, tmp_path / "killed-mid-epoch", capsys, s_full)
        return

    # A job killed after the epoch-1 checkpoint: the epoch-2 checkpoint never got its manifest.
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    ckpts = _by_epoch(killed)
    assert sorted(ckpts) == [1, 2]
    (ckpts[2][0] / MANIFEST_FILE).unlink()

    assert train.main(["--output", str(killed), "--resume"]) == 0
    captured = capsys.readouterr()
    s_res = _summary(captured.out)
    assert f"resumed from checkpoint at epoch 1, step {STEPS_PER_EPOCH}" in captured.err
    assert s_res["steps"] == s_full["steps"] and s_res["images_seen"] == s_full["images_seen"]

    # The loss at the first step after the boundary, and at the epoch's last step.
    full_ckpt = _by_epoch(full)[2][0]
    res_ckpt, res_metrics = _by_epoch(killed)[2]
    assert res_ckpt == Path(s_res["checkpoint"]) and res_ckpt.name != full_ckpt.name
    for key in ("first_loss", "loss"):
        assert res_metrics[key] == pytest.approx(full_metrics[key], rel=1e-5, abs=1e-6), key
    # The whole state at the end of the epoch.
    assert load_shared_state(full_ckpt)["step"] == 2 * STEPS_PER_EPOCH
    _assert_same_state(full_ckpt, res_ckpt)


def _resume_inside_an_epoch(full: Path, killed: Path, capsys, s_full: dict) -> None:
    """A job killed after the step-6 checkpoint, 2 steps into epoch 2: --resume continues from
    that step, the epoch's data position restored, and ends in the uninterrupted run's state."""
    every = STEP_CHECKPOINTS["swav"]
    mid = [(p, m) for p, m in _checkpoints(full) if "epoch" not in m]
    assert [(m["step"], m["epoch_in_progress"], m["epoch_step"]) for _, m in mid] == [
        (every, 1, every), (2 * every, 2, 2 * every - STEPS_PER_EPOCH)]
    assert all("data" in m and "time" in m for _, m in mid)
    state = load_shared_state(mid[1][0])
    assert (state["epoch"], state["epoch_step"], state["reason"]) == (1, 2, "steps")
    # The trackers count epochs: the checkpoints inside one are not rows of metrics.jsonl (its
    # other rows are the log steps', "kind": "step").
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r.get("kind") != "step"] == [1, 2]

    shutil.copytree(full, killed)
    (_by_epoch(killed)[2][0] / MANIFEST_FILE).unlink()
    assert train.main(["--output", str(killed), "--resume"]) == 0
    captured = capsys.readouterr()
    s_res = _summary(captured.out)
    assert f"resumed from checkpoint at epoch 1, step {2 * every} (2 steps into epoch 2)" in captured.err
    assert s_res["steps"] == s_full["steps"] and s_res["images_seen"] == s_full["images_seen"]
    assert s_res["preemptions"] == 0 and s_res["restarts"] == 0
    res_ckpt, res_metrics = _by_epoch(killed)[2]
    assert res_metrics["loss"] == pytest.approx(_by_epoch(full)[2][1]["loss"], rel=1e-5, abs=1e-6)
    _assert_same_state(_by_epoch(full)[2][0], res_ckpt)
