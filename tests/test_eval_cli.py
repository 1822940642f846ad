"""python -m rayssl.eval: the Ray Data feature job against an in-process computation, data forms, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import write_random_checkpoint
from rayssl.data.scenes import write_image_folder
from rayssl.eval import knn_top1, linear_probe_map
from rayssl.cli import eval as cli
from rayssl.eval.features import extract_features, scenes_eval_sets
from rayssl.checkpoint import load_checkpoint
from rayssl.modules.pretrained import frozen_backbone
from rayssl.eval.preprocess import center_square, label_matrix, split_train_test


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-ckpt") / "checkpoint_000"
    write_random_checkpoint(d, "swav", crop_size=32, num_prototypes=8, projection_hidden_dim=32, projection_dim=16)
    return d


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-files")
    write_image_folder(root / "flat", n=48, seed=3, size=48, layout="flat")
    write_image_folder(root / "imagefolder", n=48, seed=3, size=48, layout="imagefolder")
    return root


def _main(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _features(ckpt_dir, images: np.ndarray) -> torch.Tensor:
    net = frozen_backbone(load_checkpoint(str(ckpt_dir)))
    prepared = np.stack([center_square(im, 32) for im in images])
    return extract_features(net, prepared, 32, "cpu")


def test_knn_on_scenes_matches_an_in_process_computation(ray_session, ckpt_dir, capsys):
    rc, out, err = _main(["--checkpoint", ckpt_dir.parent, "--data", "scenes", "--protocol", "knn",  # a run dir
                          "--num-train", 80, "--num-test", 40, "--k", 5, "--seed", 1], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("knn_top1") for line in lines[:-1])  # the table comes first
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (80, 40, 12)
    assert "CPU actor(s), 64 images a batch)" in err  # the CPU's default (CPU_FEATURE_BATCH)
    train, test = scenes_eval_sets(1, 64, 80, 40)
    expected = knn_top1(_features(ckpt_dir, train["image"]), torch.from_numpy(train["label"]),
                        _features(ckpt_dir, test["image"]), torch.from_numpy(test["label"]), k=5)
    # Same pixels, same weights: at most one test image may flip on float noise near a tie.
    assert abs(result["knn_top1"] - expected) <= 1 / 40 + 1e-9


def test_labels_table_multilabel_matches_an_in_process_computation(ray_session, ckpt_dir, scene_files, capsys):
    flat = scene_files / "flat"
    rc, out, err = _main(["--checkpoint", ckpt_dir, "--data", flat, "--labels", flat / "labels.csv",
                          "--protocol", "multilabel-linear", "--test-fraction", 0.25], capsys)
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    with open(flat / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    ids = [r["id"] for r in rows]
    y, classes = label_matrix([tuple(r["classes"].split("|")) for r in rows])
    feats = _features(ckpt_dir, np.stack([np.asarray(Image.open(flat / f"{i}.png").convert("RGB")) for i in ids]))
    tr, te = split_train_test(ids, 0.25, 0)
    expected = linear_probe_map(feats[tr], torch.from_numpy(y[tr]).float(), feats[te], torch.from_numpy(y[te]).float())
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (36, 12, len(classes))
    assert result["linear_map"] == pytest.approx(expected, abs=2e-3)


def test_imagefolder_layout_linear_probe(ray_session, ckpt_dir, scene_files, tmp_path, capsys):
    """Each class folder numbers its images from 0, as many datasets do: names repeat across classes."""
    folder = tmp_path / "numbered"
    for cls in sorted(p.name for p in (scene_files / "imagefolder").iterdir() if p.is_dir()):
        (folder / cls).mkdir(parents=True)
        for n, image in enumerate(sorted((scene_files / "imagefolder" / cls).glob("*.png"))):
            (folder / cls / f"{n}.png").write_bytes(image.read_bytes())
    rc, out, err = _main(["--checkpoint", ckpt_dir, "--data", folder, "--protocol", "linear"], capsys)
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    dominant = {p.parent.name for p in folder.glob("*/*.png")}
    assert len(list(folder.glob("*/0.png"))) > 1  # the names do repeat
    assert result["num_train"] + result["num_test"] == 48 and result["num_classes"] == len(dominant)
    assert 0.0 <= result["linear_top1"] <= 1.0


def test_shards_written_with_labels_are_scored_through_their_manifest(ray_session, ckpt_dir, tmp_path, capsys):
    """rayssl shards writes the scenes' classes to train-labels.csv and names it in manifest.json:
    --data SHARDS alone scores with that table; without one, one line says so."""
    from rayssl.cli import shards
    from rayssl.eval.evaluate import EvalRequest, open_sources
    from rayssl.storage import S3Options

    out = tmp_path / "shards"
    assert shards.main(["--source", "scenes", "--num-scenes", "48", "--scene-size", "32", "--shard-size", "20",
                        "--out", str(out)]) == 0
    rc, stdout, err = _main(["--checkpoint", ckpt_dir, "--data", out, "--protocol", "multilabel-linear"], capsys)
    assert rc == 0, err
    found = json.loads(stdout.strip().splitlines()[-1])
    assert found["num_train"] + found["num_test"] == 48 and found["num_classes"] > 1
    # The table it scored with is the one the manifest names, as if given with --labels.
    named = open_sources(EvalRequest(data=str(out), labels=str(out / "train-labels.csv")), S3Options()).train
    manifest = open_sources(EvalRequest(data=str(out)), S3Options()).train
    assert manifest.labels_uri == str(out / "train-labels.csv") and manifest.labels == named.labels
    assert len(manifest.labels) == 48

    (out / "manifest.json").write_text(json.dumps({k: v for k, v in json.loads((out / "manifest.json").read_text())
                                                   .items() if k != "labels"}))
    rc, stdout, err = _main(["--checkpoint", ckpt_dir, "--data", out], capsys)
    assert rc == 2 and "without a labels table in their manifest.json" in err and "--labels" in err


def test_bad_input_is_one_line_before_any_work(ckpt_dir, scene_files, tmp_path, capsys):
    flat = scene_files / "flat"
    labels = tmp_path / "labels.csv"
    labels.write_text((flat / "labels.csv").read_text() + "scene-999999,circle,circle,a circle\n")
    not_ours = tmp_path / "not-a-checkpoint"
    not_ours.mkdir()
    (not_ours / "weights.pth").write_bytes(b"x")
    cases = [
        (["--checkpoint", ckpt_dir, "--data", flat, "--labels", labels],
         "--labels " + str(labels) + ": 1 of the 49 images it names are not in --data"),
        (["--checkpoint", not_ours, "--data", "scenes"], "not a rayssl checkpoint"),
        (["--checkpoint", ckpt_dir, "--data", tmp_path / "missing"], "does not exist"),
        (["--checkpoint", ckpt_dir, "--data", "scenes", "--k", 0], "--k: must be >= 1"),
        (["--checkpoint", ckpt_dir, "--data", flat], "no images in class folders"),
    ]
    for argv, expected in cases:
        rc, out, err = _main(argv, capsys)
        assert rc == 2 and expected in err, (argv, err)
        assert out == "" and len(err.strip().splitlines()) == 1
