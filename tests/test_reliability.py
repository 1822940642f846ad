"""Reliability (issue 8): a killed worker, a damaged checkpoint, a planted secret, NaNs.

- A SIGKILLed training worker with --max-failures 1: the run restarts from the latest
  checkpoint and ends with the steps and epochs of an uninterrupted run; summary restarts == 1.
- --resume skips checkpoint directories made incomplete on purpose and falls back to the
  newest complete one (Ray Train's own snapshot would hand the workers the damaged one).
- A planted AWS secret and session token never reach stdout/stderr, the run directory
  (config, summary, checkpoints: raw bytes and the unpickled objects) or Ray's session logs
  (the run is tests/test_cluster.py's `ray job submit`; the scanner is checked here).
- A non-finite loss or Sinkhorn code stops the step with a message naming the step, and
  stops the run without spending --max-failures on retries (the NaN would recur).
- The manifest records every rank file's size: a truncated rank_<r>.pt makes the
  checkpoint incomplete, so --resume skips it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import scan_tree, tiny_args
from rayssl.cli import train
from rayssl.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    CheckpointError,
    verify_checkpoint_dir,
    write_rank_state,
    write_shared_state,
)
from rayssl.config import ModelSection
from rayssl.engine import checked_forward
from rayssl.runtime.callbacks import StopOnNonFinite
from rayssl.runtime.driver import carried_data_counts
from rayssl.runtime.driver import train as run_training
from rayssl.runtime.internals import SNAPSHOT_FILE, resume_point
from rayssl.viz.tracking import TRACKERS_FILE, read_history, read_steps
from wandb_records import offline_runs

STEPS_PER_EPOCH = 128 // 32  # tiny_args: 128 scenes, global batch 32
EPOCHS = 3


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])  # the last stdout line is the JSON summary


def _snapshot(run: Path) -> dict:
    return json.loads((run / SNAPSHOT_FILE).read_text())


def _checkpoints_by_epoch(run: Path) -> dict[int, Path]:
    """Epoch -> checkpoint directory, for the checkpoints Ray's snapshot lists."""
    snap = _snapshot(run)
    return {r["metrics"]["epoch"]: run / r["checkpoint_dir_name"] for r in snap["checkpoint_results"]}


# --------------------------------------------------------------------------- fault injection


class _Killer(threading.Thread):
    """Once the first checkpoint is registered (Ray has written its snapshot), SIGKILL one
    RayTrainWorker process: the workers are then inside epoch 2, which is not checkpointed."""

    def __init__(self, run: Path, timeout_s: float = 240.0):
        import ray

        super().__init__(daemon=True)
        # This session's cluster only, by address and node (another Ray may run on the machine).
        self.gcs_address = ray.get_runtime_context().gcs_address
        self.node_id = ray.get_runtime_context().get_node_id()
        self.run_dir, self.timeout_s = run, timeout_s
        self.killed_pid: int | None = None
        self.epoch_at_kill: int | None = None
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from ray.util.state import list_actors

        deadline = time.monotonic() + self.timeout_s
        snap = self.run_dir / SNAPSHOT_FILE
        while not self.stop.is_set() and time.monotonic() < deadline:
            if snap.is_file():
                try:
                    latest = json.loads(snap.read_text())["latest_checkpoint_result"]
                except (json.JSONDecodeError, KeyError):
                    latest = None  # being written
                if latest:
                    actors = list_actors(address=self.gcs_address, timeout=30,
                                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                    pids = sorted(int(a.pid) for a in actors if a.pid and a.node_id == self.node_id)
                    if len(pids) != 2:
                        self.error = f"expected 2 live RayTrainWorker actors, found pids {pids}"
                        return
                    self.epoch_at_kill = latest["metrics"]["epoch"]
                    self.killed_pid = pids[-1]
                    os.kill(self.killed_pid, signal.SIGKILL)
                    return
            time.sleep(0.1)
        self.error = "the run finished (or timed out) before a checkpoint was registered"


@pytest.fixture(scope="module")
def killed_run(ray_session, race_backbone, tmp_path_factory):
    """A 3-epoch 2-worker run (checkpoint every epoch, all 3 kept) with one worker SIGKILLed
    after the first checkpoint. Returns the run directory, summary, stderr and the kill."""
    out = tmp_path_factory.mktemp("fault") / "run"
    killer = _Killer(out)
    stdout, stderr = io.StringIO(), io.StringIO()
    killer.start()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = train.main(tiny_args(out, "--epochs", str(EPOCHS), "--checkpoint-every", "1",
                                      "--keep-checkpoints", "3", "--max-failures", "1",
                                      "--set", "run.log_every_steps=2", "--wandb", "rayssl-test", backbone=race_backbone))
    finally:
        killer.stop.set()
        killer.join(timeout=60)
    return {"out": out, "rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "killer": killer, "wall_s": time.perf_counter() - t0}


def test_killed_worker_restarts_from_checkpoint_and_finishes_the_run(killed_run):
    k = killed_run["killer"]
    assert k.error is None, k.error
    assert k.killed_pid is not None and k.epoch_at_kill == 1  # killed during epoch 2 of 3
    with pytest.raises(ProcessLookupError):
        os.kill(k.killed_pid, 0)  # really gone
    assert killed_run["rc"] == 0, killed_run["stderr"][-3000:]
    s = _summary(killed_run["stdout"])
    # The same counters as an uninterrupted run of the same config.
    assert s["epochs"] == EPOCHS and s["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert s["images_seen"] == EPOCHS * 128
    assert s["restarts"] == 1
    assert json.loads((killed_run["out"] / "summary.json").read_text())["restarts"] == 1
    manifest = verify_checkpoint_dir(s["checkpoint"])
    assert manifest["step"] == EPOCHS * STEPS_PER_EPOCH and manifest["epoch"] == EPOCHS
    # Every registered checkpoint is complete, one per epoch.
    ckpts = _checkpoints_by_epoch(killed_run["out"])
    assert sorted(ckpts) == [1, 2, 3]
    for epoch, d in ckpts.items():
        manifest = verify_checkpoint_dir(d)
        assert manifest["step"] == epoch * STEPS_PER_EPOCH
        # Each worker's file size, gathered to rank 0, is in the manifest.
        for r in range(2):
            assert manifest["files"][f"rank_{r}.pt"] == (d / f"rank_{r}.pt").stat().st_size > 0
    # The restarted workers continued from the epoch-1 checkpoint (their log reaches the driver).
    assert re.search(r"resumed from checkpoint at epoch 1, step 4", killed_run["stderr"]), \
        killed_run["stderr"][-3000:]


def test_step_rows_and_the_wandb_run_survive_the_restart(killed_run):
    """Every log step (run.log_every_steps=2) has one row in metrics.jsonl, the restarted workers'
    rows replacing those of the steps they trained again; the W&B run (offline) is one run,
    which got every log step and epoch; its id is in trackers.json."""
    out = killed_run["out"]
    assert killed_run["rc"] == 0
    steps = read_steps(str(out))
    assert [s["step"] for s in steps] == list(range(2, EPOCHS * STEPS_PER_EPOCH + 1, 2))
    for s in steps:
        assert s["epoch"] == pytest.approx(s["step"] / STEPS_PER_EPOCH)
        assert math.isfinite(s["loss"]) and s["images_per_s"] > 0 and 0 <= s["data_wait_pct"] <= 100
    assert [h["epoch"] for h in read_history(str(out))] == [1, 2, 3]
    runs = offline_runs(out)
    run_id = json.loads((out / TRACKERS_FILE).read_text())["wandb"]["id"]
    assert [r["id"] for r in runs] == [run_id]
    logged = {h["_step"] for h in runs[0]["history"] if "step/loss" in h}
    assert logged == {s["step"] for s in steps}
    assert sorted(h["epoch"] for h in runs[0]["history"] if "epoch/loss" in h) == [1, 2, 3]
    assert "could not record metrics" not in killed_run["stderr"]


def test_the_summary_says_where_the_time_went_a_restart_included(killed_run):
    """The summary's ``time``: rank 0's totals (of the restarted workers: the epochs before the
    kill were lost with them) against the wall time after Ray started; the rest, a restart
    included, is ``other_s``; and a line on stderr says the same."""
    t = _summary(killed_run["stdout"])["time"]
    assert set(t) == {"ray_start_s", "after_ray_start_s", "steps_s", "data_wait_s", "first_batch_s", "eval_s",
                      "checkpoint_s", "other_s", "outside_steps_pct"}
    assert t["ray_start_s"] is None  # the session's Ray was running: the command started none
    assert t["after_ray_start_s"] <= killed_run["wall_s"] + 0.05  # rounded to 0.1 s
    assert 0 < t["steps_s"] < t["after_ray_start_s"] and t["first_batch_s"] <= t["data_wait_s"]
    assert t["eval_s"] > 0 and t["checkpoint_s"] > 0  # the last epoch is evaluated; epochs 2-3 saved
    parts = t["steps_s"] + t["data_wait_s"] + t["eval_s"] + t["checkpoint_s"] + t["other_s"]
    assert parts == pytest.approx(t["after_ray_start_s"], abs=0.3)  # rounded to 0.1 s each
    assert t["outside_steps_pct"] == pytest.approx(100 * (1 - t["steps_s"] / t["after_ray_start_s"]), abs=0.2)
    assert f"{t['outside_steps_pct']:.1f}% outside training steps" in killed_run["stderr"]


def test_resume_skips_incomplete_checkpoints_and_falls_back(killed_run, tmp_path, capsys):
    assert killed_run["rc"] == 0
    run = tmp_path / "copy"
    shutil.copytree(killed_run["out"], run)  # Ray's snapshot names checkpoints relative to the run
    ckpts = _checkpoints_by_epoch(run)
    (ckpts[3] / MANIFEST_FILE).unlink()  # latest: manifest gone (a crash before it was written)
    model = ckpts[2] / MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # next: model.pt truncated
    for d in (ckpts[3], ckpts[2]):
        with pytest.raises(CheckpointError):
            verify_checkpoint_dir(d)

    run_id = json.loads((run / TRACKERS_FILE).read_text())["wandb"]["id"]
    assert train.main(["--output", str(run), "--resume", "--wandb", "rayssl-test"]) == 0
    captured = capsys.readouterr()
    s = _summary(captured.out)
    err = captured.err
    for d in (ckpts[3], ckpts[2]):
        assert f"skipping incomplete checkpoint {d}" in err
    assert f"resuming from {ckpts[1]}" in err
    assert "resumed from checkpoint at epoch 1, step 4" in err
    # Epochs 2 and 3 trained again from the epoch-1 checkpoint: the run's counters are whole.
    assert s["epochs"] == EPOCHS and s["steps"] == EPOCHS * STEPS_PER_EPOCH and s["restarts"] == 0
    assert verify_checkpoint_dir(s["checkpoint"])["step"] == EPOCHS * STEPS_PER_EPOCH
    # The damaged directories are left as they were, and no longer listed.
    assert ckpts[3].is_dir() and not (ckpts[3] / MANIFEST_FILE).exists() and ckpts[2].is_dir()
    listed = {r["checkpoint_dir_name"] for r in _snapshot(run)["checkpoint_results"]}
    assert ckpts[3].name not in listed and ckpts[2].name not in listed
    # The resumed run logs to the same W&B run (a second offline file of the same id) and its
    # step rows replace those of the steps it trained again.
    runs = offline_runs(run)
    assert [r["id"] for r in runs] == [run_id, run_id]
    assert min(h["_step"] for h in runs[1]["history"] if "step/loss" in h) == STEPS_PER_EPOCH + 2
    assert [s["step"] for s in read_steps(str(run))] == list(range(2, EPOCHS * STEPS_PER_EPOCH + 1, 2))


# --------------------------------------------------------------------------- snapshot rewrite, no Ray


def _fake_run(root: Path, epochs: int) -> list[str]:
    """A run directory with ``epochs`` complete tiny checkpoints and Ray's snapshot listing them."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    names = []
    for e in range(1, epochs + 1):
        name = f"checkpoint_2000-01-0{e}_00-00-00.000000"
        d = root / name
        d.mkdir(parents=True)
        sizes = [write_rank_state(d, r, {"rank": r, "queue": torch.full((64,), float(r))}) for r in range(2)]
        write_shared_state(d, {"epoch": e, "step": 4 * e, "model": {"w": torch.ones(3)}}, world_size=2,
                           rank_sizes=sizes)
        names.append(name)
    # Rank 0 reports the data counts so far with each checkpoint (train.worker_group_starts is per process).
    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={
        "epoch": i + 1, "data": {"seen": 64 * (i + 1), "skipped.decode_error": i, "train.worker_group_starts": 1}})
        for i, n in enumerate(names)]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(1, epochs + 1)),
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=epochs, validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[],
    )
    (root / SNAPSHOT_FILE).write_text(state.json())
    return names


def _resumed(root: Path) -> str | None:
    """The checkpoint directory --resume would restore under ``root``."""
    point = resume_point(str(root))
    return None if point is None else point["checkpoint_dir_name"]


def _parse_snapshot(root: Path):
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    return _CheckpointManagerState.parse_obj(_snapshot(root))  # still what Ray Train reads


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic v1 calls
def test_snapshot_rewrite_keeps_complete_runs_untouched(tmp_path):
    names = _fake_run(tmp_path, 2)
    before = (tmp_path / SNAPSHOT_FILE).read_bytes()
    assert _resumed(tmp_path) == names[-1]
    assert (tmp_path / SNAPSHOT_FILE).read_bytes() == before
    assert _resumed(tmp_path / "no-such-run") is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic v1 calls
def test_snapshot_rewrite_drops_missing_and_incomplete_checkpoints(tmp_path, capsys):
    names = _fake_run(tmp_path, 3)
    shutil.rmtree(tmp_path / names[2])  # gone: Ray itself would refuse to start
    (tmp_path / names[1] / "rank_1.pt").unlink()
    assert _resumed(tmp_path) == names[0]
    snap = _parse_snapshot(tmp_path)
    assert [r.checkpoint_dir_name for r in snap.checkpoint_results] == [names[0]]
    assert snap.checkpoint_report_indices == [1] and snap.latest_checkpoint_result.checkpoint_dir_name == names[0]
    # The counts a resumed run starts from are the restored checkpoint's, not the newest one's.
    assert carried_data_counts(resume_point(str(tmp_path))) == {"seen": 64, "skipped.decode_error": 0}
    err = capsys.readouterr().err
    assert "rank_1.pt is missing" in err and f"{names[2]} is not a complete rayssl checkpoint" in err

    # Nothing complete left: the snapshot lists nothing, the run starts over, with a warning.
    (tmp_path / names[0] / MANIFEST_FILE).write_text("{not json")
    assert _resumed(tmp_path) is None
    snap = _parse_snapshot(tmp_path)
    assert snap.checkpoint_results == [] and snap.latest_checkpoint_result is None
    assert "no complete checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- secrets


def test_scanner_finds_a_planted_value(tmp_path):
    """The leak check (tests/test_cluster.py) can see a secret in a plain file and inside a checkpoint."""
    secret = f"canary-{uuid.uuid4().hex}"
    (tmp_path / "a.log").write_text(f"x {secret} y")
    torch.save({"nested": {"env": {"AWS_SECRET_ACCESS_KEY": secret}}}, tmp_path / "m.pt")
    assert set(scan_tree(tmp_path, [secret.encode()])) == {str(tmp_path / "a.log"), str(tmp_path / "m.pt")}


# A planted secret and session token in the environment of every Ray process of a whole run
# (a fresh head, then `ray job submit`) never reach the job's output, the run directory or
# Ray's session logs: tests/test_cluster.py::test_ray_job_submit_runs_rayssl_on_a_loopback_head.


# --------------------------------------------------------------------------- numerics, no Ray


@pytest.fixture(autouse=False)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _ConstantLoss(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, crops, epoch=0, step=0):
        loss = torch.tensor(self.value)
        return loss, {"loss": loss}


def test_non_finite_loss_stops_the_step_naming_it():
    with pytest.raises(FloatingPointError, match=r"^step 7 \(epoch 2\): the swav loss is not finite \(nan\)"):
        checked_forward(_ConstantLoss(float("nan")), [], epoch=2, step=7, method_name="swav")
    with pytest.raises(FloatingPointError, match=r"^step 0 \(epoch 0\): the mls loss is not finite \(inf\)"):
        checked_forward(_ConstantLoss(float("inf")), [], epoch=0, step=0, method_name="mls")
    # On GPU the loss is only looked at on log steps (no host sync per step).
    loss, _ = checked_forward(_ConstantLoss(float("nan")), [], epoch=0, step=1, method_name="swav", check_loss=False)
    assert torch.isnan(loss)
    loss, metrics = checked_forward(_ConstantLoss(1.5), [], epoch=0, step=1, method_name="swav")
    assert loss.item() == 1.5 and metrics["loss"].item() == 1.5


def test_other_value_errors_are_not_relabelled():
    class Broken(torch.nn.Module):
        def forward(self, crops, epoch=0, step=0):
            raise ValueError("expected 2 crops, got 1")

    with pytest.raises(ValueError, match="expected 2 crops"):
        checked_forward(Broken(), [], epoch=0, step=0, method_name="swav")


def test_nan_input_to_swav_stops_at_the_sinkhorn_codes(one_thread):
    from rayssl.methods.swav import SwAV, SwAVConfig

    torch.manual_seed(0)
    model = SwAV(SwAVConfig(num_prototypes=8, projection_hidden_dim=16, projection_dim=8, queue_length=0),
                 ModelSection(backbone="resnet18", small_stem=True), num_crops=2, world_size=1)
    crops = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    crops[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^step 11 \(epoch 1\): sinkhorn codes are not finite"):
        checked_forward(model, crops, epoch=1, step=11, method_name="swav")


@pytest.mark.parametrize("method", ["mls", "moco"])
def test_nan_input_to_mls_and_moco_stops_at_the_loss(one_thread, method):
    from rayssl.methods.mls import MLS, MLSConfig, MoCoConfig

    conf = (MLSConfig if method == "mls" else MoCoConfig)(
        queue_size=16, **({"k": 3} if method == "mls" else {}), projection_hidden_dim=16, projection_dim=8)
    torch.manual_seed(0)
    model = MLS(conf, ModelSection(backbone="resnet18", small_stem=True), num_crops=2)
    crops = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    crops[0][1] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"^step 5 \(epoch 0\): .*{method}.*not finite"):
        checked_forward(model, crops, epoch=0, step=5, method_name=method)


# --------------------------------------------------------------------------- rank file sizes, no Ray


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic v1 calls
def test_truncated_rank_file_is_caught_by_the_manifest_and_skipped(tmp_path, capsys):
    names = _fake_run(tmp_path, 2)
    latest = tmp_path / names[1]
    manifest = verify_checkpoint_dir(latest)
    for r in range(2):
        assert manifest["files"][f"rank_{r}.pt"] == (latest / f"rank_{r}.pt").stat().st_size
    rank1 = latest / "rank_1.pt"
    rank1.write_bytes(rank1.read_bytes()[:-16])  # truncated, not empty: only its size tells
    with pytest.raises(CheckpointError, match=r"rank_1\.pt is missing or truncated \(\d+ bytes where the "
                                              r"manifest records \d+\)"):
        verify_checkpoint_dir(latest)
    assert _resumed(tmp_path) == names[0]
    assert f"skipping incomplete checkpoint {latest}" in capsys.readouterr().err


def test_rank_sizes_must_match_the_world_size(tmp_path):
    from rayssl.checkpoint import gather_rank_sizes

    assert gather_rank_sizes(123) == [123]  # no process group: this rank only
    with pytest.raises(ValueError, match="rank_sizes has 1 entries for world_size 2"):
        write_shared_state(tmp_path, {"epoch": 1}, world_size=2, rank_sizes=[10])


# --------------------------------------------------------------------------- a recurring NaN is not retried


def test_non_finite_failures_stop_the_run_other_failures_are_retried():
    cb = StopOnNonFinite()
    wrapped = RuntimeError("ray.exceptions.RayTaskError(FloatingPointError): ...\n"
                           "FloatingPointError: step 3 (epoch 1): the mls loss is not finite (nan); lower optim.base_lr")
    with pytest.raises(FloatingPointError, match=r"^step 3 \(epoch 1\): the mls loss is not finite \(nan\); lower "
                                                 r"optim.base_lr \(worker 1; not retried"):
        cb.after_exception(None, {1: wrapped, 0: RuntimeError("collective aborted")})
    # A dead worker (SIGKILL, OOM, a lost node) is left to Ray Train's retries.
    cb.after_exception(None, {0: RuntimeError("The actor died unexpectedly before finishing this task.")})


class _FailureLog:
    """A Ray Train callback that appends one line per failed attempt to a file."""

    def __new__(cls, path: Path):
        from ray.train import UserCallback

        class FailureLog(UserCallback):
            def after_exception(self, run_context, worker_exceptions):
                with open(path, "a") as f:
                    f.write(f"{sorted(worker_exceptions)}\n")

        return FailureLog()


def test_recurring_nan_is_not_retried(ray_session, tmp_path):
    """lr 1e30 makes step 2's Sinkhorn codes NaN on every attempt: with --max-failures 2 the run
    must stop after the first attempt, with the message naming the step and the quantity."""
    from rayssl.runtime.errors import wrapped_error_message

    out, failures = tmp_path / "nan", tmp_path / "failures.txt"
    args = train.build_parser().parse_args(
        tiny_args(out, "--epochs", "1", "--max-failures", "2", "--set", "optim.base_lr=1e30",
                  "--num-workers", "1"))  # the failure policy's, not the workers': one is enough
    cfg = train.prepare_output(train.resolve_config(args), args)
    with pytest.raises(Exception) as exc:
        run_training(cfg, callbacks=[_FailureLog(failures)])
    msg = wrapped_error_message(exc.value, FloatingPointError)
    assert msg and re.match(r"step 2 \(epoch 0\): sinkhorn codes are not finite", msg), str(exc.value)[-2000:]
    assert "not retried" in msg
    assert len(failures.read_text().splitlines()) == 1  # one failed attempt, no retry
