"""Every byte goes to the store the user named, from every process of a run.

The Ray processes of the test session (Ray Train's controller and workers, Ray Data tasks,
actors) were started with ``AWS_ENDPOINT_URL`` pointing at a closed loopback port (conftest),
and the driver here has it unset: a process that re-derived the endpoint from its own
environment, instead of carrying the one the user gave (``--s3-endpoint``), would write
nowhere, or to AWS. So each file a command promises must be in the moto bucket.
"""

from __future__ import annotations

import json

import pytest
import s3fs

from conftest import TEST_BACKBONE
from rayssl.cli import eval as eval_cli
from rayssl.cli import viz as viz_cli
from rayssl.cli.label import main as label_main
from rayssl.cli.train import main as train_main
from rayssl.storage import S3Options, StorageError, filesystem, read_text


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_labels_training_trackers_eval_and_pictures_all_reach_the_named_store(
        ray_session, s3_endpoint, tiny_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # only --s3-endpoint names the store
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("travels")
    endpoint = ["--s3-endpoint", s3_endpoint]

    # CDUL stage 1 writes its Parquet (from the CLIP actors' job), meta and summary to S3.
    labels = "s3://travels/labels"
    assert label_main(["--data", "scenes", "--num-scenes", "32", "--scenes-size", "32", "--clip-model",
                       "rayssl-tiny-clip", "--clip-pretrained", tiny_clip, "--out", labels, "--num-actors", "1",
                       "--batch-size", "16", *endpoint]) == 0
    assert _last_json(capsys.readouterr().out)["images_labelled"] == 32
    assert fs.find("travels/labels", withdirs=False) and fs.exists("travels/labels/pseudolabels.json")

    # Stage 2 on 2 workers: the workers read the label table from S3 themselves; the controller
    # records metrics.jsonl and curves.png there; checkpoints, config and summary go there too.
    run = "s3://travels/runs/cdul"
    tb = tmp_path / "tb"
    assert train_main(["--method", "cdul", "--pseudo-labels", labels, "--output", run, "--preset", "quick",
                       "--num-workers", "2", "--batch-size", "16", "--epochs", "1",
                       "--set", "data.scenes_image_size=32", "--set", "data.crop_sizes=[32]",
                       *TEST_BACKBONE, "--set", "eval.num_train_images=20",
                       "--set", "eval.num_test_images=20", "--set", "eval.knn_k=5", "--tensorboard", str(tb),
                       *endpoint]) == 0
    captured = capsys.readouterr()
    summary = _last_json(captured.out)
    assert summary["steps"] == 2 and summary["checkpoint"].startswith(f"{run}/checkpoint_")
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "curves.png"):
        assert fs.exists(f"travels/runs/cdul/{name}"), name
    history = [json.loads(line) for line in fs.cat_file("travels/runs/cdul/metrics.jsonl").decode().splitlines()]
    assert [h["epoch"] for h in history] == [1] and "classifier_map" in history[-1]
    assert fs.exists(summary["checkpoint"].split("://", 1)[1] + "/manifest.json")
    assert list(tb.glob("events*"))  # TensorBoard stays where --tensorboard says (a local directory)
    assert "could not record metrics" not in captured.err
    # The endpoint the shell named is in the run's config: a resume or a sweep trial carries it on.
    assert f"s3_endpoint: {s3_endpoint}" in read_text(f"{run}/config.yaml", S3Options(endpoint=s3_endpoint))

    # Reading the run back: evaluation from the S3 checkpoint, a picture written to S3.
    assert eval_cli.main(["--checkpoint", run, "--data", "scenes", "--num-train", "20", "--num-test", "10",
                          "--k", "5", *endpoint]) == 0
    assert _last_json(capsys.readouterr().out)["checkpoint"].startswith(f"{run}/checkpoint_")
    assert viz_cli.main(["curves", "--run", run, "--out", "s3://travels/pictures/curves.png", *endpoint]) == 0
    assert fs.cat_file("travels/pictures/curves.png")[:4] == b"\x89PNG"


def test_a_process_without_the_options_refuses_instead_of_guessing(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match=r"s3://bkt/run/metrics.jsonl: no storage options reached this process"):
        filesystem("s3://bkt/run/metrics.jsonl")
    # The environment is read once, where a command starts, and then carried explicitly.
    assert S3Options.resolved().endpoint == "http://127.0.0.1:9"
    assert S3Options.resolved("http://127.0.0.1:10").endpoint == "http://127.0.0.1:10"
    assert S3Options(endpoint="http://x:1", anonymous=True).signed() == S3Options(endpoint="http://x:1")
