"""The command line: every bad value is refused before Ray starts, naming the option."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import exit_code
from rayssl.cli import train


def _error(capsys, argv) -> str:
    assert exit_code(train.main, argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--batch-size", "7", "--num-workers", "2"], "--batch-size (run.batch_size): global batch 7 is not divisible"),
        (["--epochs", "0"], "--epochs (run.epochs): must be >= 1"),
        (["--num-workers", "0", "--max-failures", "1"], "--max-failures (run.max_failures): an in-process run"),
        (["--num-workers", "0-2"], "run.max_workers: an in-process run (run.num_workers=0) has no workers to resize"),
        (["--set", "swav.temperature=-0.1"], "swav.temperature: must be > 0"),
        (["--set", "swav.num_prototypes=0"], "swav.num_prototypes: must be >= 1"),
        (["--set", "swav.epsilon=abc"], "swav.epsilon: cannot read 'abc'"),
        (["--set", "swav.bogus=1"], "unknown key(s) swav.bogus; valid keys in swav: num_prototypes"),
        (["--set", "data.crop_counts=[1,2]"], "data.crop_counts: the first (large) group needs >= 2 crops"),
        (["--set", "data.min_scale=[0.5,0.9]", "--set", "data.max_scale=[1.0,0.3]"], "need 0 < min_scale <= max_scale"),
        (["--set", "model.backbone=vgg"], "model.backbone: unknown backbone 'vgg'"),
        (["--set", "optim.optimizer=adam"], "optim.optimizer: must be lars, sgd or adamw, got 'adam'"),
        (["--set", "swav.queue_length=33"], "swav.queue_length: 33 is not divisible by run.num_workers=2"),
        (["--set", "swav.queue_length=16"], "must hold at least its batch"),
        (["--set", "nonsense"], "--set: expected section.key=value"),
        (["--data", "/nonexistent/images"], "data source '/nonexistent/images' does not exist"),
        (["--set", "data.crop_sizes=[96,32]"], "data.crop_sizes: the largest crop (96 px) is larger than the built-in scenes"),
        (["--method", "mls", "--set", "mls.k=64", "--set", "mls.queue_size=64"], "mls.k: must be smaller than mls.queue_size=64"),
        (["--num-workers", "3-2"], "argument --num-workers: MIN-MAX needs MIN <= MAX, got '3-2'"),
        (["--num-workers", "two"], "argument --num-workers: expected N or MIN-MAX (e.g. 2-8), got 'two'"),
        (["--num-workers", "1-3", "--batch-size", "32"],
         "--batch-size (run.batch_size): global batch 32 is not divisible by 3 workers (the run may train with "
         "any of 1-3"),
        (["--num-workers", "2-3", "--batch-size", "96", "--set", "swav.queue_length=200"],
         "swav.queue_length: 200 is not divisible by run.num_workers=3"),
        (["--checkpoint-every-steps", "0"], "--checkpoint-every-steps (run.checkpoint_every_steps): must be >= 1"),
        (["--max-preemptions", "-2"], "--max-preemptions (run.max_preemptions): must be >= 0, or -1 for unlimited"),
        (["--set", "run.checkpoint_upload=later"], "run.checkpoint_upload: must be async or sync, got 'later'"),
        (["--set", "run.preemption_check_every_steps=-1"], "run.preemption_check_every_steps: must be >= 0"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(capsys, argv, expected):
    assert expected in _error(capsys, argv)


def test_a_worker_range_is_an_elastic_run_and_a_count_a_fixed_one(capsys):
    assert train.main(["--num-workers", "2-4", "--batch-size", "96", "--print-config"]) == 0
    run = yaml.safe_load(capsys.readouterr().out)["run"]
    assert (run["num_workers"], run["max_workers"]) == (2, 4)
    assert train.main(["--num-workers", "3", "--batch-size", "63", "--print-config"]) == 0
    run = yaml.safe_load(capsys.readouterr().out)["run"]
    assert (run["num_workers"], run["max_workers"]) == (3, None)


def test_the_progress_flag_turns_ray_datas_bars_on(capsys):
    assert train.main(["--print-config"]) == 0
    run = yaml.safe_load(capsys.readouterr().out)["run"]
    assert run["progress_bars"] is False  # a log file is not flooded by default
    assert train.main(["--progress", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["progress_bars"] is True


def test_unknown_method_is_refused_by_argparse(capsys):
    assert "invalid choice: 'byol'" in _error(capsys, ["--method", "byol"])


def test_unknown_yaml_key_lists_the_valid_keys(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    err = _error(capsys, ["--config", str(f)])
    assert "unknown key(s) optim.learning_rate" in err and "base_lr" in err
    f.write_text("optimiser:\n  base_lr: 0.1\n")
    assert "unknown section(s) 'optimiser'" in _error(capsys, ["--config", str(f)])
    assert "file not found" in _error(capsys, ["--config", str(tmp_path / "missing.yaml")])


def test_precedence_defaults_preset_file_flags(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  epochs: 7\n  batch_size: 128\nswav:\n  epsilon: 0.03\n")
    assert train.main(["--config", str(f), "--epochs", "9", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["run"]["epochs"] == 9  # flag beats file
    assert cfg["run"]["batch_size"] == 128  # file beats preset (quick: 64)
    assert cfg["swav"]["epsilon"] == 0.03
    assert cfg["swav"]["num_prototypes"] == 256  # quick preset beats paper default (3000)
    assert train.main(["--preset", "paper", "--print-config"]) == 0
    paper = yaml.safe_load(capsys.readouterr().out)
    assert paper["swav"]["num_prototypes"] == 3000 and paper["data"]["crop_sizes"] == [224, 96]
    assert paper["data"]["crop_counts"] == [2, 6] and paper["model"]["backbone"] == "resnet50"


def test_existing_run_is_not_overwritten_and_resume_needs_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert "holds no rayssl run" in _error(capsys, ["--output", str(out), "--resume"])
    (out / "config.yaml").write_text("run: {}\n")
    # A run that failed before its first checkpoint: nothing to continue, so the message says so.
    err = _error(capsys, ["--output", str(out)])
    assert "holds a run that stopped before its first checkpoint; choose another --output" in err
    (out / train.SNAPSHOT_FILE).write_text("{}")
    err = _error(capsys, ["--output", str(out)])
    assert "already holds a run; pass --resume" in err
    assert (out / "config.yaml").read_text() == "run: {}\n"


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "rayssl.train", "--help"], capture_output=True, text=True, check=True).stdout
    for opt in ["--method", "--data", "--output", "--epochs", "--batch-size", "--num-workers", "--use-gpu",
                "--config", "--resume", "--seed", "--max-failures", "--preset", "--set"]:
        assert opt in out
    assert "{swav" in out  # choices come from the method registry


@pytest.mark.parametrize("module, argv", [
    ("rayssl.cli.train", []),
    ("rayssl.cli.label", []),
    ("rayssl.cli.eval", []),
    ("rayssl.cli.export", []),
    ("rayssl.cli.viz", ["curves"]),
    ("rayssl.cli.shards", []),
    ("rayssl.cli.bench", []),
])
def test_every_command_checks_the_s3_endpoint_the_same_way(module, argv, capsys):
    """One --s3-endpoint in every command: an endpoint without a scheme is refused while the
    arguments are parsed (before Ray, S3 or any file is touched), naming the flag."""
    import importlib

    main = importlib.import_module(module).main
    assert exit_code(main, [*argv, "--s3-endpoint", "127.0.0.1:9000"]) == 2
    err = capsys.readouterr().err
    assert "--s3-endpoint" in err and "must be a URL such as http://127.0.0.1:9000, got '127.0.0.1:9000'" in err
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    assert "--s3-endpoint URL" in capsys.readouterr().out


def test_eval_reads_the_dataset_anonymously_but_its_own_checkpoint_signed(monkeypatch, capsys):
    """rayssl.eval --s3-anonymous: the checkpoint (the user's run) is read signed."""
    from rayssl import storage
    from rayssl.checkpoint import CheckpointError
    from rayssl.cli import eval as eval_main

    seen = []

    def fake_load(uri, options=None, flag="--checkpoint"):
        seen.append(options)
        raise CheckpointError(f"--checkpoint {uri}: stop here")

    monkeypatch.setattr(eval_main, "load_checkpoint", fake_load)
    assert eval_main.main(["--checkpoint", "s3://mine/run", "--s3-endpoint", "http://127.0.0.1:9",
                           "--s3-anonymous"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen == [storage.S3Options(endpoint="http://127.0.0.1:9", anonymous=False)]


def test_labelling_job_refuses_parquet_shards_before_any_work(tmp_path, capsys):
    """CDUL's second stage re-reads each image by its address (a file, or a byte range of a tar
    shard); a Parquet row has none, so Parquet shards are refused with the reason."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from rayssl.cli.label import main as pseudolabel_main

    shards = tmp_path / "shards"
    shards.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    pq.write_table(pa.table({"key": ["000000"], "image": [png.getvalue()]}), shards / "train-000000.parquet")
    out = tmp_path / "labels"
    assert pseudolabel_main(["--data", str(shards), "--classes", "a,b", "--clip-model", "ViT-B-32",
                             "--clip-pretrained", "openai", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds parquet shards; the labelling job reads image files (a folder or prefix), uncompressed " \
           "webdataset .tar shards or 'scenes'" in err
    assert not out.exists()  # nothing written


def test_labelling_job_reads_anonymously_but_never_writes_so(capsys, monkeypatch):
    """--s3-anonymous is for a public --data bucket; --out (the user's bucket) stays signed."""
    from rayssl import storage
    from rayssl.cli import label
    from rayssl.cli.common import UserError

    seen = []

    def fake_exists(uri, options=None):
        seen.append((uri, options))
        raise UserError("stop here")  # refused after the --out check: no job runs

    monkeypatch.setattr(label, "check_clip_args", lambda *args: None)
    monkeypatch.setattr(label, "exists", fake_exists)
    assert label.main(["--data", "scenes", "--clip-model", "m", "--clip-pretrained", "p", "--out",
                       "s3://bucket/labels", "--s3-endpoint", "http://127.0.0.1:9", "--s3-anonymous"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen == [("s3://bucket/labels/pseudolabels.json",
                     storage.S3Options(endpoint="http://127.0.0.1:9", anonymous=False))]
    assert label.main(["--data", "scenes", "--clip-model", "m", "--clip-pretrained", "p", "--out", "x",
                       "--num-actors", "0"]) == 2
    assert "--num-actors: must be >= 1" in capsys.readouterr().err


def test_a_run_that_does_not_beat_random_init_says_what_that_means():
    summary = {"method": "swav", "metric": "knn_top1", "knn_top1": 0.098, "knn_top1_random_init": 0.106}
    scenes = train.baseline_note(summary, builtin_scenes=True)
    assert "0.098 is not above the random-init backbone's 0.106" in scenes
    # On the built-in scenes the method's own measured expectation is said in place (no pointer elsewhere).
    assert "spread between seeds" in scenes and "install is not broken" in scenes and "README" not in scenes
    own_data = train.baseline_note(summary, builtin_scenes=False)
    assert "train for longer" in own_data and "spread between seeds" not in own_data
    moco = train.baseline_note({**summary, "method": "moco"}, builtin_scenes=True)
    assert "MoCo-v2 and MLS" in moco and "spread between seeds" not in moco
    # Images a random backbone already separates perfectly cannot show learning: "train for longer" would mislead.
    easy = train.baseline_note({**summary, "knn_top1": 1.0, "knn_top1_random_init": 1.0}, builtin_scenes=False)
    assert "already scores the maximum" in easy and "train for longer" not in easy
    # Nothing to explain when it wins, or when there was no baseline to compare with.
    assert train.baseline_note({**summary, "knn_top1": 0.12}, builtin_scenes=True) is None
    assert train.baseline_note({"method": "swav", "metric": "knn_top1", "knn_top1": 0.1}, True) is None


def test_sync_batchnorm_on_cpu_workers_is_refused_before_training(ray_session, tmp_path, capsys):
    """PyTorch's SyncBatchNorm runs on GPUs only: on CPU workers the run is refused with the
    setting to change, not failed at its first step."""
    from conftest import tiny_args

    err = _error(capsys, tiny_args(tmp_path / "run", "--set", "model.sync_batchnorm=true"))
    assert "model.sync_batchnorm" in err and "GPUs only" in err and "model.sync_batchnorm=false" in err
    assert not (tmp_path / "run" / "config.yaml").exists()
