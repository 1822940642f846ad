"""experiments/swav_trials.py: the harness behind the README's SwAV trials pairs each seed's
trained backbone with its own random init, and summarises the gains over seeds."""

from __future__ import annotations

import json
import math

import torch

from conftest import TEST_BACKBONE_SETS
from experiments_loader import load_experiment
from rayssl.eval.features import evaluate_on_scenes, scenes_eval_sets
from rayssl.modules.backbone import build_backbone

trials = load_experiment("swav_trials")


def test_config_is_the_quick_preset_with_the_users_overrides():
    cfg = trials.build_config(["swav.epsilon=0.03", "run.epochs=2"], seed=5)
    assert cfg.run.seed == 5 and cfg.run.epochs == 2 and cfg.run.num_workers == 1
    assert cfg.method.epsilon == 0.03
    default = trials.build_config([], seed=0)
    assert default.method.num_prototypes == 256 and default.optim.optimizer == "sgd"


def test_summary_is_the_mean_paired_gain_and_its_standard_error():
    runs = [{"random_init": r, "curve": [{"step": 8, "knn_top1": a}, {"step": 16, "knn_top1": b}]}
            for r, a, b in [(0.10, 0.13, 0.09), (0.12, 0.13, 0.12), (0.11, 0.16, 0.10)]]
    out = trials.summarise(runs)
    gains = [0.03, 0.01, 0.05]
    mean = sum(gains) / 3
    se = math.sqrt(sum((g - mean) ** 2 for g in gains) / 2) / math.sqrt(3)
    assert out[0]["step"] == 8 and out[0]["seeds_above"] == 3 and out[0]["seeds"] == 3
    assert math.isclose(out[0]["mean_gain"], round(mean, 4)) and math.isclose(out[0]["se"], round(se, 4))
    assert out[1]["seeds_above"] == 0 and math.isclose(out[1]["mean_gain"], round((-0.01 + 0 - 0.01) / 3, 4))


def test_a_tiny_run_reports_its_own_random_init_and_a_curve(capsys):
    sets = ["run.epochs=1", "data.scenes_num_images=128", "data.scenes_image_size=32",
            "data.crop_sizes=[32,16]", *TEST_BACKBONE_SETS]
    assert trials.main(["--seeds", "3", "--eval-every", "1", "--eval-train", "60", "--eval-test", "30",
                        *sum((["--set", s] for s in sets), [])]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = out["runs"]
    assert [p["step"] for p in run["curve"]] == [1, 2]  # 128 scenes at the preset's batch of 64
    assert all(math.isfinite(p["loss"]) for p in run["curve"])
    # The baseline is the backbone the run started from: torch seed 3, built first.
    torch.manual_seed(3)
    net, _ = build_backbone("timm:test_resnet", small_stem=False)
    expected = evaluate_on_scenes("knn_top1", net, scenes_eval_sets(3, 32, 60, 30), 32, "cpu")
    assert math.isclose(run["random_init"], round(expected, 4))
    assert out["summary"][0]["seeds"] == 1 and math.isnan(out["summary"][0]["se"])


def test_the_harness_and_the_pure_pytorch_parts_import_no_ray():
    """The harness is meant for a GPU machine that has torch but not Ray; losses, modules,
    methods, the engine (the training step) and the benchmark's step are pure PyTorch by design."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from experiments_loader import load_experiment; "
            "load_experiment('swav_trials'); import rayssl.losses, rayssl.modules, rayssl.methods, rayssl.engine, "
            "rayssl.bench.step, rayssl.data.feed, rayssl.checkpoint, rayssl.presets, rayssl.eval.features; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code, str(tests)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
