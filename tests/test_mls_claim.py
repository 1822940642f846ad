"""experiments/mls_claim.py without Ray: the table's numbers and the resume/skip logic.

The ``python -m rayssl.train`` subprocess is replaced by a fake runner that writes what a
finished run leaves (config.yaml, summary.json) and prints its JSON summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments_loader import load_experiment

mls_claim = load_experiment("mls_claim")

# Scores a fake run reports, by (method, seed).
SCORES = {("moco", 0): 0.31, ("mls", 0): 0.35, ("moco", 1): 0.33, ("mls", 1): 0.32,
          ("moco", 2): 0.29, ("mls", 2): 0.34}
RANDOM = {0: 0.22, 1: 0.24, 2: 0.21}


def _flag(argv, name):
    return argv[argv.index(name) + 1]


class FakeRunner:
    """Records each command line and behaves like a finished (or failed) training run."""

    def __init__(self, fail=None, random_in_summary=True, steps=256):
        self.calls: list[list[str]] = []
        self.fail, self.random_in_summary, self.steps = fail, random_in_summary, steps

    def __call__(self, argv, log):
        self.calls.append(argv)
        method, seed, out = _flag(argv, "--method"), int(_flag(argv, "--seed")), Path(_flag(argv, "--output"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(f"run: {{batch_size: 64}}\n{method}: {{queue_size: 1024, lam: "
                                         f"{0.5 if method == 'mls' else 0.0}}}\n")
        if self.fail == (method, seed):
            with open(log, "a") as f:
                f.write("[rayssl] epoch 1/1 step 3/4 loss=nan\nrayssl: training failed: FloatingPointError: loss\n")
            return mls_claim.Completed(1, "", 1.0)
        summary = {"method": method, "metric": "linear_map", "linear_map": SCORES[(method, seed)], "wall_s": 10.0,
                   "steps": self.steps}
        if self.random_in_summary:
            summary["linear_map_random_init"] = RANDOM[seed]
        (out / "summary.json").write_text(json.dumps(summary))
        return mls_claim.Completed(0, "some line\n" + json.dumps(summary) + "\n", 12.0)


def _run(tmp_path, capsys, runner, *extra, random_init=None):
    argv = ["--work", str(tmp_path / "w"), "--epochs", "2", "--num-scenes", "256", *extra]
    rc = mls_claim.main(argv, runner=runner, random_init=random_init or (lambda d: pytest.fail("not needed")))
    out = capsys.readouterr().out
    return rc, out, json.loads(out.strip().splitlines()[-1])


def test_aggregate_matches_numpy_and_differences_per_seed():
    rows = [mls_claim.per_seed_row(s, RANDOM[s], SCORES[("moco", s)], SCORES[("mls", s)]) for s in (0, 1, 2)]
    assert [round(r["mls_minus_moco"], 10) for r in rows] == [0.04, -0.01, 0.05]
    assert [round(r["mls_minus_random"], 10) for r in rows] == [0.13, 0.08, 0.13]
    agg = mls_claim.aggregate(rows)
    for col, values in (("random", [0.22, 0.24, 0.21]), ("moco", [0.31, 0.33, 0.29]),
                        ("mls", [0.35, 0.32, 0.34]), ("mls_minus_moco", [0.04, -0.01, 0.05])):
        assert agg[col]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert agg[col]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert agg[col]["n"] == 3
    assert agg["mls_minus_moco"]["mean"] == pytest.approx(0.08 / 3)
    assert agg["mls_wins"] == 2
    one = mls_claim.aggregate(rows[:1])
    assert one["mls"]["std"] is None and one["mls"]["mean"] == pytest.approx(0.35)

    table = mls_claim.format_table(rows, agg)
    assert "| 1 | 0.2400 | 0.3300 | 0.3200 | -0.0100 |" in table
    assert f"| mean ± std (n=3) | 0.2233 ± {np.std([0.22, 0.24, 0.21], ddof=1):.4f} |" in table


def test_runs_differ_only_in_method_and_output(tmp_path):
    s = {"preset": "quick", "epochs": 3, "num_scenes": 512, "batch_size": 64, "num_workers": 2,
         "set": ["eval.num_test_images=200"]}
    a = mls_claim.train_argv("moco", 4, tmp_path / "seed4" / "moco", s)
    b = mls_claim.train_argv("mls", 4, tmp_path / "seed4" / "mls", s)
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    outputs = (str(tmp_path / "seed4" / "moco"), str(tmp_path / "seed4" / "mls"))
    assert len(a) == len(b) and diff == [("moco", "mls"), outputs]
    assert _flag(a, "--seed") == "4" and _flag(a, "--epochs") == "3" and "data.scenes_num_images=512" in a
    assert "eval.num_test_images=200" in a and "--resume" not in a
    assert mls_claim.train_argv("mls", 4, tmp_path, s, resume=True)[-1] == "--resume"


def test_full_run_then_resume_skips_finished_runs(tmp_path, capsys):
    runner = FakeRunner()
    rc, out, summary = _run(tmp_path, capsys, runner, "--seeds", "0", "1")
    assert rc == 0 and len(runner.calls) == 4
    assert summary["seeds"] == [0, 1] and summary["mls_wins"] == 1
    assert summary["mls_multilabel_steps"] == {"0": 240, "1": 240}
    assert summary["mls_minus_moco"]["mean"] == pytest.approx(np.mean([0.04, -0.01]))
    assert summary["moco"]["std"] == pytest.approx(np.std([0.31, 0.33], ddof=1))
    work = tmp_path / "w"
    results = json.loads((work / "results.json").read_text())
    assert [r["random"] for r in results["rows"]] == [0.22, 0.24]
    assert "| 0 | 0.2200 | 0.3100 | 0.3500 | +0.0400 |" in (work / "results.md").read_text()
    assert "| 0 | 0.2200 | 0.3100 | 0.3500 | +0.0400 |" in out

    # Seed 2 added later; seed 2's mls run was interrupted (config.yaml, no summary.json).
    (work / "seed2" / "mls").mkdir(parents=True)
    (work / "seed2" / "mls" / "config.yaml").write_text("run: {}\n")
    runner2 = FakeRunner()
    rc, _, summary = _run(tmp_path, capsys, runner2, "--seeds", "0", "1", "2")
    assert rc == 0
    assert [(_flag(c, "--method"), _flag(c, "--seed"), c[-1] == "--resume") for c in runner2.calls] == [
        ("moco", "2", False), ("mls", "2", True)]
    assert summary["mls"]["mean"] == pytest.approx(np.mean([0.35, 0.32, 0.34]))
    assert summary["random"]["std"] == pytest.approx(np.std([0.22, 0.24, 0.21], ddof=1))


def test_other_settings_or_foreign_dir_are_refused(tmp_path, capsys):
    assert _run(tmp_path, capsys, FakeRunner(), "--seeds", "0")[0] == 0
    runner = FakeRunner()
    with pytest.raises(SystemExit, match="other settings.*epochs: 2 there, 3 now"):
        mls_claim.main(["--work", str(tmp_path / "w"), "--epochs", "3", "--num-scenes", "256", "--seeds", "0"],
                       runner=runner)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        mls_claim.main(["--work", str(other)], runner=runner)
    assert runner.calls == [] and not (other / "benchmark.json").exists()


def test_failed_run_reports_stderr_tail_and_exits_nonzero(tmp_path, capsys):
    runner = FakeRunner(fail=("mls", 1))
    rc = mls_claim.main(["--work", str(tmp_path / "w"), "--seeds", "0", "1"], runner=runner)
    captured = capsys.readouterr()
    assert rc == 1 and len(runner.calls) == 4
    assert json.loads(captured.out.strip().splitlines()[-1]) == {
        "failed": {"method": "mls", "seed": 1, "returncode": 1, "log": str(tmp_path / "w" / "seed1" / "mls.log")},
        "finished_seeds": [0]}
    assert "training failed: FloatingPointError" in captured.err and "loss=nan" in captured.err
    assert not (tmp_path / "w" / "results.json").exists()


def test_random_init_computed_once_per_seed_when_missing(tmp_path, capsys):
    computed = []

    def random_init(run_dir):
        computed.append(run_dir)
        return RANDOM[int(run_dir.parent.name.removeprefix("seed"))]

    rc, _, summary = _run(tmp_path, capsys, FakeRunner(random_in_summary=False), "--seeds", "0", "2",
                          random_init=random_init)
    assert rc == 0 and computed == [tmp_path / "w" / "seed0" / "moco", tmp_path / "w" / "seed2" / "moco"]
    assert summary["random"]["mean"] == pytest.approx(np.mean([0.22, 0.21]))
    # Cached: a second call reads it back instead of evaluating again.
    rc, _, again = _run(tmp_path, capsys, FakeRunner(), "--seeds", "0", "2", random_init=random_init)
    assert rc == 0 and len(computed) == 2 and again["random"] == summary["random"]


def test_multilabel_steps_flags_a_budget_where_mls_is_moco(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {batch_size: 64}\nmls: {queue_size: 1024, lam: 0.5}\n")
    # 1024 / 64 = 16 steps fill the queue; the term is on from step 17.
    assert [mls_claim.multilabel_steps(run, {"steps": n}) for n in (4, 16, 17, 256)] == [0, 0, 1, 240]
    assert mls_claim.multilabel_steps(tmp_path / "missing", {"steps": 256}) is None

    rc, _, summary = _run(tmp_path, capsys, FakeRunner(steps=8), "--seeds", "0")
    assert rc == 0 and summary["mls_multilabel_steps"] == {"0": 0}
    assert "multi-label term never started** (seeds 0" in (tmp_path / "w" / "results.md").read_text()
