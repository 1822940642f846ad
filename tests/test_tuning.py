"""Ray Tune sweeps (issue 6): search spaces, their validation, trial planning, and a real
2-trial sweep to S3 that is interrupted and resumed with the same --output, on the user's
images in the store, its trials ranked by a kNN on the user's labelled ones (issue 23)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import s3fs
import yaml

from conftest import tiny_args
from test_cluster import end_processes_under
from rayssl.cli import train
from rayssl.checkpoint import load_checkpoint, verify_checkpoint_dir
from rayssl.config import ConfigError
from rayssl.cli import sweep
from rayssl.methods import get_method, method_names
from rayssl.space import Dim, randint
from rayssl.storage import S3Options
from tuning import runner
from tuning.spaces import default_space, load_space_file, to_tune, validate_space

REPO = Path(__file__).resolve().parents[1]


def _base(method: str, *extra: str) -> dict:
    """The resolved run config a sweep of ``method`` starts from (quick preset)."""
    args = train.build_parser().parse_args(["--method", method, *extra])
    return train.resolve_config(args).to_dict()


# --------------------------------------------------------------------------- spaces


@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_has_a_default_space_that_validates(method):
    # When a method is registered (cdul included), its default space must name real keys
    # with ranges every trial can run with, under both presets.
    assert get_method(method).space, f"no default search space for {method}"
    space = default_space(method)
    assert any(k == "optim.base_lr" for k in space)
    extra = ["--set", "cdul.pseudo_labels=s3://bucket/labels"] if method == "cdul" else []  # CDUL requires it
    validate_space(space, _base(method, *extra))
    validate_space(space, _base(method, "--preset", "paper", *extra))


SPACE_ERRORS = [
    # (method, yaml text, what the one-line error must say)
    ("swav", "swav:\n  epsilonn: {uniform: [0.01, 0.1]}\n", "swav.epsilonn: unknown key; valid keys in swav:"),
    ("swav", "swavv:\n  epsilon: 0.05\n", "swavv.epsilon: unknown section 'swavv'"),
    ("swav", "swav:\n  temperature: {uniform: [-0.1, 0.2]}\n", "swav.temperature: must be > 0, got -0.1"),
    ("swav", "optim:\n  base_lr: {loguniform: [0.5, 0.1]}\n", "optim.base_lr: impossible range [0.5, 0.1]"),
    ("swav", "optim:\n  base_lr: {loguniform: [0, 0.1]}\n", "optim.base_lr: loguniform needs bounds > 0"),
    ("swav", "swav:\n  epsilon: {normal: [0, 1]}\n", "swav.epsilon: expected one of"),
    ("swav", "run:\n  output: {choice: [a, b]}\n", "run.output: set by the sweep itself"),
    # k above the smallest queue a trial could draw: caught at the corner k=2000, D=1024.
    ("mls", "mls:\n  k: {choice: [10, 2000]}\n  queue_size: {choice: [1024, 4096]}\n",
     "mls.k: must be smaller than mls.queue_size=1024"),
]


@pytest.mark.parametrize("method,text,message", SPACE_ERRORS)
def test_bad_search_space_fails_before_any_trial_naming_the_key(tmp_path, capsys, method, text, message):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    out = tmp_path / "sweep"
    rc = sweep.main(["--method", method, "--num-samples", "2", "--search-space", str(f), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and str(f) in err, err
    assert len(err.strip().splitlines()) == 1  # one line
    assert not out.exists()  # nothing started, nothing written


def test_space_file_replaces_only_its_keys_and_randint_includes_both_bounds(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("swav:\n  epsilon: {loguniform: [0.03, 0.04]}\n  queue_start_epoch: {randint: [0, 2]}\n"
                 "  sinkhorn_iterations: 5\n")
    loaded = load_space_file(f)
    assert loaded["swav.epsilon"] == Dim("loguniform", (0.03, 0.04)) and loaded["swav.sinkhorn_iterations"] == 5
    space = {**default_space("swav"), **loaded}
    assert space["swav.num_prototypes"] == get_method("swav").space["swav.num_prototypes"]  # default kept
    validate_space(space, _base("swav"))
    draws = {to_tune(randint(0, 2)).sample() for _ in range(300)}
    assert draws == {0, 1, 2}  # Tune's randint excludes its upper bound; ours does not
    eps = [to_tune(space["swav.epsilon"]).sample() for _ in range(200)]
    assert all(0.03 <= e <= 0.04 for e in eps)


def test_sweep_refuses_train_options_it_owns(tmp_path, capsys):
    assert sweep.main(["--resume", "--output", str(tmp_path / "s")]) == 2
    assert "--resume: a sweep resumes by itself" in capsys.readouterr().err
    assert sweep.main(["--set", "eval.every_epochs=3", "--output", str(tmp_path / "s")]) == 2
    assert "eval.every_epochs" in capsys.readouterr().err


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize("cluster,workers,samples,expect_concurrent,expect_cpw", [
    ({"CPU": 2}, 2, 8, 1, 0.37),             # this machine: one trial, workers share what data leaves
    ({"CPU": 16}, 2, 8, 4, 1.0),             # 4 x (0.25 + 2 x 1 + 1) = 13 <= 16 < 5 x 3.25
    ({"CPU": 16}, 2, 3, 3, 1.0),             # never more than the samples
    ({"CPU": 96, "GPU": 8}, 2, 8, 4, 1.0),   # GPUs bind first: 8 GPUs / 2 per trial
    ({"CPU": 8, "GPU": 8}, 4, 8, 1, 1.0),    # CPUs bind first: 8 // 5.25
])
def test_trials_never_oversubscribe_the_cluster(cluster, workers, samples, expect_concurrent, expect_cpw):
    concurrent, cpw = runner.plan_trials(cluster, workers, None, None, samples)
    assert (concurrent, cpw) == (expect_concurrent, expect_cpw)
    per_trial = runner.TRIAL_DRIVER_CPU + workers * cpw + runner.DATA_CPU
    assert concurrent * per_trial <= cluster["CPU"] + 1e-9
    assert concurrent * workers <= cluster.get("GPU", float("inf"))
    # a user's --max-concurrent wins; a trial needing more GPUs than exist is refused
    assert runner.plan_trials(cluster, workers, None, None, samples, max_concurrent=2)[0] == min(2, samples)
    with pytest.raises(ConfigError, match="--num-workers: each trial needs 16 GPUs"):
        runner.plan_trials({"CPU": 64, "GPU": 8}, 16, True, None, 4)


# --------------------------------------------------------------------------- a real sweep


def _sweep_args(out: str, space_dir: Path, endpoint: str, data: str, eval_data: str) -> list[str]:
    space = space_dir / "space.yaml"
    space.write_text("swav:\n  num_prototypes: {choice: [16, 32]}\n  epsilon: {loguniform: [0.03, 0.08]}\n"
                     "  queue_length: 0\noptim:\n  base_lr: {loguniform: [0.05, 0.3]}\n")
    return ["--num-samples", "2", "--max-concurrent", "1", "--scheduler", "asha", "--search-space", str(space),
            "--s3-endpoint", endpoint,
            *tiny_args(out, "--epochs", "2", "--checkpoint-every", "1", "--data", data, "--preset", "quick",
                       "--eval-data", eval_data,
                       "--set", "eval.knn_k=5",
                       # One worker a trial: this test is about Tune's resume, not the worker count
                       # (2 workers' state across a resume: tests/test_resume_equivalence.py): a
                       # worker process fewer to start at each of the three trial starts.
                       "--num-workers", "1")]


def _user_data_on_s3(fs, local: Path) -> tuple[str, str]:
    """64 unlabelled scene JPEGs and 40 labelled ones (an ImageFolder) in the test store."""
    from rayssl.data.scenes import write_image_folder

    train = write_image_folder(local / "unlabelled", 64, seed=5, size=48, fmt="jpg", split="train")
    val = write_image_folder(local / "labelled", 40, seed=5, size=48, fmt="jpg", layout="imagefolder",
                             split="eval-train")
    fs.put(str(train), "sweeps/data/unlabelled", recursive=True)
    fs.put(str(val), "sweeps/data/labelled", recursive=True)
    return "s3://sweeps/data/unlabelled", "s3://sweeps/data/labelled"


def test_sweep_to_s3_interrupted_then_resumed_with_the_same_output(ray_session, s3_endpoint, tmp_path, listings,
                                                                   monkeypatch):
    # The output is in the test store, named by --s3-endpoint only: the environment of this
    # process and of every Ray process names a closed port (conftest), so a trial, Tune's own
    # state or a callback that re-derived the endpoint would write nowhere.
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("sweeps")
    out, key = "s3://sweeps/swav", "sweeps/swav"
    data, eval_data = _user_data_on_s3(fs, tmp_path)  # trials ranked by the user's images (issue 23)
    args = _sweep_args(out, tmp_path, s3_endpoint, data, eval_data)
    # 1. A sweep in its own process (own local Ray), interrupted with Ctrl-C once its first
    #    trial has started training.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "tuning.sweep", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not fs.glob(f"{key}/trials/*/config.yaml") and proc.poll() is None and time.monotonic() < deadline:
            fs.invalidate_cache()
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        started = sorted(p.split("/")[-2] for p in fs.glob(f"{key}/trials/*/config.yaml"))
        proc.send_signal(signal.SIGINT)
        first_log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        end_processes_under(ray_tmp)
    fs.invalidate_cache()
    stored = json.loads(fs.cat_file(f"{key}/{runner.SPEC_FILE}"))
    assert stored["num_samples"] == 2 and stored["method"] == "swav"
    assert len(started) == 1, first_log[-3000:]
    assert not fs.exists(f"{key}/trials/{started[0]}/summary.json")  # it really was cut short

    # 2. The same command again, in this process: Tune restores the experiment from the store,
    #    the interrupted trial continues under the same id, the other one runs.
    stdout, stderr = io.StringIO(), io.StringIO()
    handed: list = []
    with_parameters = runner.tune.with_parameters

    def spied(fn, **params):
        handed.append(params)
        return with_parameters(fn, **params)

    monkeypatch.setattr(runner.tune, "with_parameters", spied)
    listings.clear()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = sweep.main(args)
    assert rc == 0, stderr.getvalue()[-3000:]
    # The bucket was listed once, by the command, and that listing handed to every trial.
    assert listings == [data] and [p["source"].uri for p in handed] == [data]
    assert "sweep: resuming" in stderr.getvalue()
    assert "could not record metrics" not in stderr.getvalue()
    fs.invalidate_cache()
    results = json.loads(stdout.getvalue().strip().splitlines()[-1])
    assert results == json.loads(fs.cat_file(f"{key}/results.json"))
    assert results["metric"] == "knn_top1" and results["eval_data"] == eval_data  # what it ranked by, and on what
    trials = {t["trial"]: t for t in results["trials"]}
    assert len(trials) == 2 and started[0] in trials
    assert {p.split("/")[-1] for p in fs.ls(f"{key}/trials")} == set(trials)  # no third run directory
    for t in trials.values():
        assert t["status"] in ("FINISHED", "STOPPED"), t  # ASHA may stop the weaker one after epoch 1
        assert 0.0 <= t["knn_top1"] <= 1.0
        assert t["params"]["swav.num_prototypes"] in (16, 32) and 0.03 <= t["params"]["swav.epsilon"] <= 0.08
        run_cfg = yaml.safe_load(fs.cat_file(f"{key}/trials/{t['trial']}/config.yaml"))
        assert run_cfg["swav"]["num_prototypes"] == t["params"]["swav.num_prototypes"]  # the trial trained them
        assert fs.exists(f"{key}/trials/{t['trial']}/summary.json") == (t["status"] == "FINISHED")
    assert any(t["status"] == "FINISHED" for t in trials.values())
    assert fs.find(f"{key}/tune")  # Tune's own experiment state, which the second sweep restored from
    best = results["best"]
    assert best["knn_top1"] == max(t["knn_top1"] for t in trials.values())
    ckpt = best["checkpoint"]
    assert ckpt.rsplit("/", 1)[0] == f"{out}/trials/{best['trial']}"
    verify_checkpoint_dir(ckpt.split("://", 1)[1], fs=fs)
    assert load_checkpoint(ckpt, S3Options(endpoint=s3_endpoint)).epoch == best["epochs"]
    text = fs.cat_file(f"{key}/results.txt").decode()
    assert f"best: {best['trial']}" in text and ckpt in text and "swav.epsilon" in text.splitlines()[0]


def test_a_trial_trains_on_the_sweeps_listing_unless_it_sweeps_the_source(tmp_path, monkeypatch):
    """Each trial reads the listing the sweep command made (a bucket's listing can take minutes);
    a trial whose swept config names another source lists its own."""
    from types import SimpleNamespace

    from rayssl.config import Config
    from rayssl.data.scenes import write_image_folder
    from rayssl.data.sources import resolve_source

    first = str(write_image_folder(tmp_path / "a", 4, seed=1, size=32, fmt="jpg", split="train"))
    other = str(write_image_folder(tmp_path / "b", 4, seed=2, size=32, fmt="jpg", split="train"))
    base = Config.from_dict({"data": {"source": first}}).to_dict()
    source = resolve_source(first)
    trained: list = []
    monkeypatch.setattr(runner, "train", lambda cfg, callbacks, source: trained.append((cfg.data.source, source)))
    monkeypatch.setattr(runner.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setattr(runner, "EpochReports", lambda: "reports to Tune")  # (needs a Tune session)
    runner.train_trial({"swav.epsilon": 0.05}, base, str(tmp_path / "sweep"), 1.0, source=source)
    runner.train_trial({"data.source": other}, base, str(tmp_path / "sweep"), 1.0, source=source)
    assert trained == [(first, source), (other, None)]


def test_a_trial_that_reported_its_last_epoch_without_a_summary_was_stopped_not_finished(tmp_path):
    """ASHA can stop a trial at its last report (a rung it passed unrecorded across a resume):
    it trained every epoch but never wrote its summary; the results call it STOPPED."""
    from types import SimpleNamespace

    from tuning.runner import collect_results

    def trial(tid, epoch, knn):
        return SimpleNamespace(metrics={"trial_id": tid, "epoch": epoch, "knn_top1": knn, "loss": 5.0},
                               metrics_dataframe=None, error=None, config={"swav.epsilon": 0.05}, path=str(tmp_path / tid))

    (tmp_path / "trials" / "a").mkdir(parents=True)
    (tmp_path / "trials" / "a" / "summary.json").write_text("{}")
    grid = [trial("a", 2, 0.3), trial("b", 2, 0.2), trial("c", 1, 0.1)]
    r = collect_results(grid, "knn_top1", 2, str(tmp_path), ["swav.epsilon"])
    assert {t["trial"]: t["status"] for t in r["trials"]} == {"a": "FINISHED", "b": "STOPPED", "c": "STOPPED"}
    assert r["best"]["trial"] == "a"
