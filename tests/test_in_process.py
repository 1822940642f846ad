"""An in-process run (``--num-workers 0``, Ray Train's local mode): the training function in the
driver, Ray Data feeding it, and rayssl storing what Ray Train would -- checkpoints under the
output (the newest ``run.keep_checkpoints`` complete ones), every report to the run's trackers,
``--resume`` from the newest complete checkpoint, also on workers.

Resumed from the epoch-2 checkpoint, after the epoch-3 one lost its manifest (a run killed while
storing it), the run ends where the uninterrupted run ended, to the bit: in-process, and on a
Ray Train worker, which has no snapshot of Ray Train's to restore from and trains epoch 3 as the
driver did (``data.deterministic``, fp32, and one torch thread, as Ray gives a worker holding
one CPU; with two threads the float rounding differs, and 12 SwAV steps amplify it to 0.3% of
the loss).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_args
from rayssl.checkpoint import (MANIFEST_FILE, load_shared_state, verify_checkpoint_dir, write_rank_state,
                               write_shared_state)
from rayssl.cli import train
from rayssl.config import Config, ConfigError
from rayssl.runtime.driver import in_process_device, resume_from
from rayssl.runtime.internals import SNAPSHOT_FILE
from rayssl.runtime.reports import REPORT_FILE, InProcessReports, newest_checkpoint
from rayssl.storage import S3Options, filesystem, s3_filesystem
from rayssl.space import choice
from tuning.runner import plan_trials
from tuning.spaces import validate_space

EPOCHS = 3
# tiny_args' test backbone on 2 x 32 + 2 x 16 crops: this test is about storing,
# keeping and resuming, and its 20 steps run at fp32 on one thread.
SAME = ["--epochs", str(EPOCHS), "--checkpoint-every", "1", "--keep-checkpoints", "2",
        "--set", "data.deterministic=true", "--set", "run.precision=fp32", "--set", "data.crop_counts=[2,2]"]


def _run(capsys, out: Path, *extra: str) -> dict:
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an in-process run's step runs here: as many threads as the worker's
    try:
        assert train.main(tiny_args(out, *SAME, *extra)) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())


def _weights(checkpoint: Path) -> dict:
    return load_shared_state(checkpoint)["model"]


def test_in_process_run_stores_what_ray_train_would(ray_session, tmp_path, capsys):
    out = tmp_path / "local"
    s = _run(capsys, out, "--num-workers", "0")
    assert s["epochs"] == EPOCHS and s["steps"] == EPOCHS * 4 and s["workers"] == 1
    assert s["data"]["seen"] == EPOCHS * 128
    assert s["time"]["other_s"] is not None
    # the newest 2 complete checkpoints, each with the metrics reported with it; the summary names the last
    kept = _checkpoints(out)
    assert len(kept) == 2, kept
    for c in kept:
        verify_checkpoint_dir(c)
    assert [json.loads((c / REPORT_FILE).read_text())["epoch"] for c in kept] == [2, 3]
    assert s["checkpoint"] == str(kept[-1])
    assert not (out / SNAPSHOT_FILE).exists()  # nothing of Ray Train's controller
    # every epoch's report reached the run's trackers (the CLI's metrics recorder)
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") != "step"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["loss"] == pytest.approx(s["final_loss"])

    w_local = _weights(kept[-1])

    # killed while storing epoch 3's checkpoint: --resume continues from epoch 2, in-process ...
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    (_checkpoints(cut)[-1] / MANIFEST_FILE).unlink()
    resumed = _run(capsys, cut, "--num-workers", "0", "--resume")
    assert resumed["final_loss"] == s["final_loss"] and resumed["steps"] == s["steps"]
    assert resumed["data"]["seen"] == s["data"]["seen"]  # the counts carried on from the checkpoint
    for k, v in _weights(Path(resumed["checkpoint"])).items():
        assert torch.equal(v, w_local[k]), k
    assert len(_checkpoints(cut)) == 3  # the incomplete one is left as it was, 2 complete kept

    # the finished run: not overwritten without --resume; resumed, nothing left to train, its
    # summary still names its last checkpoint and loss
    capsys.readouterr()
    assert train.main(tiny_args(out, "--num-workers", "0")) != 0
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    done = _run(capsys, out, "--num-workers", "0", "--resume")
    assert (done["checkpoint"], done["final_loss"], done["steps"]) == (str(kept[-1]), s["final_loss"], s["steps"])
    assert _checkpoints(out) == kept

    # ... and on a Ray Train worker (no snapshot of Ray Train's to restore from), which trains
    # epoch 3 to the bit as the in-process run did
    cut_w = tmp_path / "cut_worker"
    shutil.copytree(out, cut_w)
    (_checkpoints(cut_w)[-1] / MANIFEST_FILE).unlink()
    on_worker = _run(capsys, cut_w, "--num-workers", "1", "--resume")
    assert (on_worker["steps"], on_worker["final_loss"]) == (s["steps"], s["final_loss"])
    assert on_worker["data"]["seen"] == s["data"]["seen"]
    for k, v in _weights(Path(on_worker["checkpoint"])).items():
        assert torch.equal(v, w_local[k]), k


def test_in_process_settings_are_checked():
    cfg = Config.from_dict({"run": {"num_workers": 0, "batch_size": 3}})
    assert cfg.run.in_process and list(cfg.run.worker_counts) == [1]
    with pytest.raises(ConfigError, match="run.max_workers"):
        Config.from_dict({"run": {"num_workers": 0, "max_workers": 2}})
    with pytest.raises(ConfigError, match="no worker to restart"):
        Config.from_dict({"run": {"num_workers": 0, "max_failures": 1}})
    with pytest.raises(ConfigError, match="or 0 to train in this process"):
        Config.from_dict({"run": {"num_workers": -1}})
    with pytest.raises(ConfigError, match="sweep's trials train on Ray Train workers"):
        plan_trials({"CPU": 8}, 0, None, None, num_samples=2)


def _fake_checkpoint(tmp_path: Path, epoch: int) -> str:
    """A complete one-rank checkpoint as the engine writes it, in a fresh local directory."""
    d = tmp_path / f"written-{epoch}"
    d.mkdir()
    size = write_rank_state(d, 0, {"epoch": epoch})
    write_shared_state(d, {"epoch": epoch, "step": 4 * epoch, "model": {"w": torch.full((2,), float(epoch))}},
                       1, [size])
    return str(d)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_in_process_reports_store_keep_and_find(tmp_path, where, request):
    """Each checkpoint copied to the output with its metrics, the manifest last; the ``keep``
    complete ones training had gone furthest at kept (an incomplete one left as it is); the
    callbacks handed every report; ``newest_checkpoint`` finds the newest complete one that an
    in-process run stored -- on a local disk and on S3."""
    options = None
    if where == "s3":
        options = S3Options(endpoint=request.getfixturevalue("s3_endpoint"))
        fs = s3_filesystem(options)
        fs.mkdir("in-process-run")
        output = "s3://in-process-run/out"
    else:
        output = str(tmp_path / "out")
    seen = []

    class Recorder:
        def after_report(self, run_context, metrics, checkpoint):
            seen.append((metrics[0]["epoch"] if "epoch" in metrics[0] else None, checkpoint is not None))

    # a complete checkpoint from earlier in training under a later name (a clock set back since):
    # kept in order of training progress, not of names, so it is the first to go
    fs, root = filesystem(output, options)
    early = f"{root}/checkpoint_9999-01-01_00-00-00.000000"
    fs.put(_fake_checkpoint(tmp_path, 0) + "/", early + "/", recursive=True)
    reports = InProcessReports(output, options, keep=2, callbacks=[Recorder()])
    assert newest_checkpoint(output, options) is None  # Ray Train's kind: no report.json
    stored = []
    for epoch in (1, 2, 3):
        reports.report({"step": epoch * 4})  # a step's progress: no checkpoint
        directory = _fake_checkpoint(tmp_path, epoch)
        reports.report({"epoch": epoch, "loss": 1.0 / epoch}, directory)
        assert not Path(directory).exists()  # moved, not left behind
        stored.append(reports.last_checkpoint)
    assert seen == [(None, False), (1, True), (None, False), (2, True), (None, False), (3, True)]
    assert reports.last_metrics == {"epoch": 3, "loss": 1.0 / 3}
    names = lambda: sorted(e.rsplit("/", 1)[-1] for e in fs.ls(root, detail=False))  # noqa: E731
    assert names() == [s.rsplit("/", 1)[-1] for s in stored[1:]]  # the newest 2
    uri, metrics = newest_checkpoint(output, options)
    assert (uri, metrics["epoch"]) == (stored[2], 3)
    # the newest loses its manifest (a run killed while storing it): the one before is found,
    # and the next store keeps it and the new one, leaving the incomplete one alone
    fs.rm(f"{root}/{stored[2].rsplit('/', 1)[-1]}/{MANIFEST_FILE}")
    assert newest_checkpoint(output, options)[0] == stored[1]
    restoring = InProcessReports(output, options, keep=2, restore=stored[1])
    with restoring.restored().as_directory() as restored:
        assert torch.equal(load_shared_state(restored)["model"]["w"], torch.full((2,), 2.0))
    reports.report({"epoch": 4}, _fake_checkpoint(tmp_path, 4))
    assert names() == sorted(s.rsplit("/", 1)[-1] for s in [stored[1], stored[2], reports.last_checkpoint])


def test_resume_takes_an_in_process_checkpoint_not_an_unlisted_one_of_ray_train(tmp_path):
    """``resume_from`` without a Ray Train snapshot: the newest complete checkpoint an in-process
    run stored (with its report.json) is resumed, with its metrics; a newer complete one without a
    report.json -- Ray Train's, unregistered when its run ended -- is passed over, as before."""
    out = tmp_path / "out"
    reports = InProcessReports(str(out), None, keep=3)
    reports.report({"epoch": 1, "data": {"seen": 128}}, _fake_checkpoint(tmp_path, 1))
    assert resume_from(str(out), None) == (reports.last_checkpoint, {"epoch": 1, "data": {"seen": 128}})
    unlisted = out / "checkpoint_9999-01-01_00-00-00.000000"
    shutil.copytree(_fake_checkpoint(tmp_path, 2), unlisted)
    verify_checkpoint_dir(unlisted)
    assert newest_checkpoint(str(out))[0] == reports.last_checkpoint
    assert resume_from(str(out), None)[0] == reports.last_checkpoint


def test_in_process_device_and_sweep_refusal():
    """The device is the run's choice on this machine (Ray Train's local mode would take CUDA
    whenever torch sees it); a sweep space that could draw num_workers=0 is refused."""
    if torch.cuda.is_available():
        assert (in_process_device(None), in_process_device(False)) == ("cuda", "cpu")
    else:
        assert (in_process_device(None), in_process_device(False)) == ("cpu", "cpu")
        with pytest.raises(ConfigError, match="torch sees no GPU"):
            in_process_device(True)
    base = Config.from_dict({"run": {"batch_size": 8}}).to_dict()
    with pytest.raises(ConfigError, match="sweep's trials train on Ray Train workers.*could draw run.num_workers=0"):
        validate_space({"run.num_workers": choice(0, 2)}, base)
