"""CDUL end to end on Ray: the pseudo-labelling job (2 CLIP actors, undecodable images skipped
and counted) and 2-worker classifier training with gradient alignment and checkpoints (resume:
tests/test_resume_equivalence.py).

The CLIP is rayssl's tiny open_clip model, trained once per module for a few steps (its
quality does not matter here; benchmarks/cdul_scenes.py measures quality) and loaded through
the same ``--clip-pretrained PATH`` path as a real checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayssl.checkpoint import load_shared_state
from rayssl.pseudolabel.labels import initial_labels
from rayssl.pseudolabel.store import read_pseudo_labels, store_from_pseudo_labels


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from rayssl.pseudolabel.tiny_clip import train_tiny_clip

    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    train_tiny_clip(str(path), steps=6, seconds=60, batch_size=32, num_scenes=64)
    return str(path)


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory):
    from rayssl.data.scenes import write_image_folder

    root = tmp_path_factory.mktemp("scenes") / "imgs"
    write_image_folder(root, 32, seed=3, size=32)
    (root / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "zz-empty.jpg").write_bytes(b"")
    return root


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _latest_checkpoint(run) -> str:
    return str(sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))[-1])


def test_pseudolabel_job_then_cdul_training_with_resume(ray_session, tiny_clip, scene_folder, tmp_path, capsys):
    from rayssl.pseudolabel.__main__ import main as label_main
    from rayssl.train import main as train_main

    out = tmp_path / "labels"
    args = ["--data", str(scene_folder), "--classes", "circle,square,triangle,star,cross,ring,diamond,crescent,"
            "heart,arrow,hourglass,tee", "--clip-model", "rayssl-tiny-clip", "--clip-pretrained", tiny_clip,
            "--out", str(out), "--num-actors", "2", "--batch-size", "4", "--labels", str(scene_folder / "labels.csv")]
    assert label_main(args) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["images_labelled"] == 32
    # A pool of 2 labelling actors; which of them gets the 9 small blocks is Ray Data's
    # scheduling (seen once in CI: one actor took all), so only the pool size is exact.
    assert summary["num_actors"] == 2 and 1 <= summary["actors_used"] <= 2
    assert summary["data"]["seen"] == 34
    assert summary["data"]["skipped.decode_error"] == 1 and summary["data"]["skipped.empty"] == 1
    for key in ("map_global", "map_aggregated", "map_final"):
        assert 0.0 < summary[key] <= 1.0
    meta, cols = read_pseudo_labels(str(out), columns=("index", "id", "soft_label", "global", "aggregated"))
    assert sorted(cols["index"].tolist()) == list(range(32))  # the two bad files were listed last
    assert np.allclose(cols["global"].sum(1), 1.0, atol=1e-4)  # softmax over classes
    want = initial_labels(torch.from_numpy(cols["global"]), torch.from_numpy(cols["aggregated"])).numpy()
    assert np.allclose(cols["soft_label"], want, atol=1e-6)
    assert meta["num_rows"] == 34 and len(meta["classes"]) == 12
    # Re-running into the same --out is refused (nothing overwritten).
    with pytest.raises(SystemExit):
        label_main(args)
    assert "already holds pseudo-labels" in capsys.readouterr().err

    run = tmp_path / "run"
    train = ["--method", "cdul", "--data", str(scene_folder), "--pseudo-labels", str(out), "--output", str(run),
             "--preset", "quick", "--num-workers", "2", "--batch-size", "16", "--epochs", "2",
             "--set", "data.crop_sizes=[32]", "--set", "data.crop_counts=[2]", "--set", "data.min_scale=[0.5]",
             "--set", "data.max_scale=[1.0]", "--set", "model.small_stem=true",
             "--set", "eval.num_train_images=20", "--set", "eval.num_test_images=40", "--set", "eval.knn_k=5",
             "--set", "cdul.label_warmup_epochs=1", "--set", "cdul.label_lr=2.0"]
    assert train_main(train) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["method"] == "cdul" and result["steps"] == 4
    assert 0.0 < result["classifier_map"] <= 1.0
    initial, _ = store_from_pseudo_labels(str(out))
    store = load_shared_state(_latest_checkpoint(run))["method_state"]["label_store"]
    # Epoch 1 is warm-up, epoch 2 updates: one update per step, gathered from both workers,
    # so every image seen (2 steps x 16 = all 32) moved, whichever worker saw it.
    assert store["updates"] == 2
    moved = (store["latent"] - initial.latent).abs().amax(1) > 1e-6
    assert int(moved.sum()) == 32 and not bool(moved[32:].any())
    # Resuming restores the label store: tests/test_resume_equivalence.py (cdul) compares it,
    # and the whole epoch after the boundary, with an uninterrupted run's.
