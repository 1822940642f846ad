"""CDUL end to end on Ray: the pseudo-labelling job (2 CLIP actors, undecodable images skipped
and counted) and 2-worker classifier training with gradient alignment and checkpoints (resume:
tests/test_resume_equivalence.py).

The CLIP is rayssl's tiny open_clip model, trained once per module for a few steps (its
quality does not matter here; experiments/cdul_scenes.py measures quality) and loaded through
the same ``--clip-pretrained PATH`` path as a real checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TEST_BACKBONE
from rayssl.checkpoint import load_shared_state
from rayssl.pseudolabel.labels import initial_labels
from rayssl.data.pseudo_labels import read_pseudo_labels
from rayssl.pseudolabel.store import store_from_pseudo_labels


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory):
    from rayssl.data.scenes import write_image_folder

    root = tmp_path_factory.mktemp("scenes") / "imgs"
    write_image_folder(root, 32, seed=3, size=32)
    (root / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "zz-empty.jpg").write_bytes(b"")
    return root


CLASSES = "circle,square,triangle,star,cross,ring,diamond,crescent,heart,arrow,hourglass,tee"


def _label_args(data, out, clip: str) -> list[str]:
    return ["--data", str(data), "--classes", CLASSES, "--clip-model", "rayssl-tiny-clip",
            "--clip-pretrained", clip, "--out", str(out), "--num-actors", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def folder_labels(ray_session, tiny_clip, scene_folder, tmp_path_factory):
    """The labelling job's output for the image folder (its summary is read back from the output)."""
    from rayssl.cli.label import main as label_main

    out = tmp_path_factory.mktemp("labels") / "folder"
    assert label_main(_label_args(scene_folder, out, tiny_clip) + ["--labels", str(scene_folder / "labels.csv")]) == 0
    return out


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _latest_checkpoint(run) -> str:
    return str(sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))[-1])


def test_pseudolabel_job_then_cdul_training(ray_session, tiny_clip, scene_folder, folder_labels, tmp_path, capsys,
                                            listings):
    from rayssl.cli.label import main as label_main
    from rayssl.cli.train import main as train_main

    out = folder_labels
    summary = json.loads((out / "summary.json").read_text())
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
    assert label_main(_label_args(scene_folder, out, tiny_clip)) == 2
    assert "already holds pseudo-labels" in capsys.readouterr().err

    run = tmp_path / "run"
    train = ["--method", "cdul", "--data", str(scene_folder), "--pseudo-labels", str(out), "--output", str(run),
             "--preset", "quick", "--num-workers", "2", "--batch-size", "16", "--epochs", "2",
             "--set", "data.crop_sizes=[32]", "--set", "data.crop_counts=[2]", "--set", "data.min_scale=[0.5]",
             "--set", "data.max_scale=[1.0]", *TEST_BACKBONE,
             "--set", "eval.num_train_images=20", "--set", "eval.num_test_images=40", "--set", "eval.knn_k=5",
             "--set", "cdul.label_warmup_epochs=1", "--set", "cdul.label_lr=2.0"]
    listings.clear()
    assert train_main(train) == 0
    assert listings == [str(scene_folder)]  # checked before Ray starts; the training rows come from the table
    captured = capsys.readouterr()
    result = _last_json(captured.out)
    assert result["method"] == "cdul" and result["steps"] == 4
    # A folder of images (scenes written as files, but a user's folder to the run) without
    # --eval-data: no evaluation, said once, rather than a score on generated scenes.
    assert result["classifier_map"] is None and result["eval_data"] is None
    assert captured.err.count("no evaluation during this run") == 1
    initial, _ = store_from_pseudo_labels(str(out))
    store = load_shared_state(_latest_checkpoint(run))["method_state"]["label_store"]
    # Epoch 1 is warm-up, epoch 2 updates: one update per step, gathered from both workers,
    # so every image seen (2 steps x 16 = all 32) moved, whichever worker saw it.
    assert store["updates"] == 2
    moved = (store["latent"] - initial.latent).abs().amax(1) > 1e-6
    assert int(moved.sum()) == 32 and not bool(moved[32:].any())
    # Resuming restores the label store: tests/test_resume_equivalence.py (cdul) compares it,
    # and the whole epoch after the boundary, with an uninterrupted run's.


def test_ground_truth_that_cannot_score_the_labels_fails_before_the_job(tiny_clip, scene_folder, tmp_path, capsys):
    from rayssl.cli.label import main as label_main

    tree = tmp_path / "truth"
    for cls in ("circle", "square"):  # each class folder numbers its images: file stems repeat
        (tree / cls).mkdir(parents=True)
        (tree / cls / "0001.png").write_bytes((scene_folder / "scene-000000.png").read_bytes())
    for labels, expected in ((tmp_path / "missing.csv", "--labels: "),
                             (tree, "'circle/0001' and 'square/0001' have the same file stem '0001'")):
        out = tmp_path / "out"
        assert label_main(_label_args(scene_folder, out, tiny_clip) + ["--labels", str(labels)]) == 2
        err = capsys.readouterr().err
        assert expected in err and str(labels) in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # no labelling happened, nothing written


def test_a_folder_scored_on_its_own_class_folders_matches_by_path(ray_session, tiny_clip, scene_folder, tmp_path,
                                                                   capsys):
    """Class folders that number their images from 0 (names repeat across them) score the
    pseudo-labels by each image's own folder."""
    import csv

    from rayssl.cli.label import main as label_main
    from rayssl.eval.metrics import mean_average_precision

    tree, counts = tmp_path / "tree", {}
    with open(scene_folder / "labels.csv") as f:
        for row in list(csv.DictReader(f))[:16]:
            n = counts[row["dominant"]] = counts.get(row["dominant"], -1) + 1
            (tree / row["dominant"]).mkdir(parents=True, exist_ok=True)
            (tree / row["dominant"] / f"{n}.png").write_bytes((scene_folder / f"{row['id']}.png").read_bytes())
    assert max(counts.values()) > 0 and len(counts) > 1  # some names repeat across folders
    out = tmp_path / "out"
    assert label_main(_label_args(tree, out, tiny_clip) + ["--labels", str(tree)]) == 0
    summary = _last_json(capsys.readouterr().out)
    _, cols = read_pseudo_labels(str(out), columns=("path", "soft_label"))
    classes = CLASSES.split(",")
    gt = np.zeros((len(cols["path"]), len(classes)), np.float32)
    for r, path in enumerate(cols["path"]):
        gt[r, classes.index(str(path).split("/")[-2])] = 1.0
    assert summary["images_labelled"] == 16 and gt.sum() == 16
    assert summary["map_final"] == round(mean_average_precision(cols["soft_label"], gt), 4)


def test_pseudolabel_job_reads_tar_shards_by_byte_range(ray_session, tiny_clip, scene_folder, folder_labels,
                                                        tmp_path, capsys):
    """The same images as webdataset shards (one of them truncated): each image is labelled as
    from the folder, its row holds the byte range of its member in the shard, and CDUL's
    training rows read exactly the labelled images back through those ranges."""
    import tarfile

    from rayssl.data.indexed import build_indexed_train_data
    from rayssl.data.shards import write_shards
    from rayssl.data.tar import iter_tar_images
    from rayssl.cli.label import main as label_main
    from rayssl.cli.train import build_parser, resolve_config

    shards = tmp_path / "shards"
    write_shards(str(scene_folder), str(shards), "webdataset", shard_size=10)
    capsys.readouterr()
    files = sorted(shards.glob("*.tar"))
    assert len(files) == 4  # 34 files: 10 + 10 + 10 + 4
    whole = files[1].read_bytes()
    files[1].write_bytes(whole[: len(whole) // 2])  # cut in the middle of a member
    survivors = []  # what the streaming reader gets out of the cut shard before the damage
    with pytest.raises((tarfile.TarError, EOFError, OSError)):
        with open(files[1], "rb") as f:
            for key, _ in iter_tar_images(f):
                survivors.append(key)
    assert 0 < len(survivors) < 10

    out = tmp_path / "labels"
    assert label_main(_label_args(shards, out, tiny_clip)) == 0
    summary = _last_json(capsys.readouterr().out)
    # 34 members listed minus the cut shard's lost ones; the broken PNG and the empty JPG are
    # members too, skipped and counted at decode as from the folder.
    listed = 34 - 10 + len(survivors)
    assert summary["data"]["skipped.unreadable_shard"] == 1
    assert summary["data"]["seen"] == listed
    assert summary["data"]["skipped.decode_error"] == 1 and summary["data"]["skipped.empty"] == 1
    assert summary["images_labelled"] == listed - 2

    meta, cols = read_pseudo_labels(str(out), columns=("index", "id", "path", "offset", "length", "soft_label"))
    assert meta["source"]["kind"] == "webdataset" and meta["num_rows"] == listed
    assert sorted(cols["index"].tolist()) == sorted(set(cols["index"].tolist()))
    assert set(cols["id"]) >= set(survivors) - {"zz-broken", "zz-empty"}
    for path, key, off, n in zip(cols["path"], cols["id"], cols["offset"], cols["length"]):
        with open(path, "rb") as f:  # the row's byte range is the original file
            f.seek(int(off))
            assert f.read(int(n)) == (scene_folder / f"{key}.png").read_bytes()
    _, ref = read_pseudo_labels(str(folder_labels), columns=("id", "soft_label"))
    by_id = dict(zip(ref["id"], ref["soft_label"]))
    assert np.allclose(cols["soft_label"], np.stack([by_id[k] for k in cols["id"]]), atol=1e-5)

    cfg = resolve_config(build_parser().parse_args([
        "--method", "cdul", "--data", str(shards), "--pseudo-labels", str(out), "--preset", "quick",
        "--set", "data.crop_sizes=[32]", "--set", "data.crop_counts=[2]", "--set", "data.min_scale=[0.5]",
        "--set", "data.max_scale=[1.0]"]))
    data = build_indexed_train_data(cfg.data, cfg.run.seed, str(out))
    rows = list(data.dataset.iter_batches(batch_size=None, batch_format="numpy"))
    seen = np.concatenate([r["index"] for r in rows])
    assert sorted(seen.tolist()) == sorted(cols["index"].tolist())  # every labelled image, once
    assert all(r["crop_0"].shape[1:] == (32, 32, 3) for r in rows)
    assert not any(k.startswith("skipped.") for k in data.stats.get())


def test_training_order_does_not_depend_on_the_labelling_jobs_row_order(ray_session, tmp_path):
    """Two labelling outputs with the same rows written in different orders (the job's actors
    write in whatever order they finish) give the same training stream for the same seed."""
    from ray.data import DataContext

    from conftest import write_scene_pseudo_labels
    from rayssl.data.indexed import build_indexed_train_data
    from rayssl.cli.train import build_parser, resolve_config

    n, classes = 40, CLASSES.split(",")
    soft = np.random.default_rng(0).uniform(0.05, 0.95, size=(n, len(classes))).astype(np.float32)
    outs = [write_scene_pseudo_labels(tmp_path / name, classes, soft, rows, size=32)
            for name, rows in (("ordered", np.arange(n)), ("shuffled", np.random.default_rng(1).permutation(n)))]
    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        streams = []
        for out in outs:
            cfg = resolve_config(build_parser().parse_args([
                "--method", "cdul", "--pseudo-labels", str(out), "--set", "data.deterministic=true",
                "--set", "data.scenes_image_size=32", "--set", "data.crop_sizes=[32]",
                "--set", "data.read_batch_size=8"]))
            rows = build_indexed_train_data(cfg.data, cfg.run.seed, str(out)).dataset.take_all()
            streams.append([int(r["index"]) for r in rows])
    finally:
        ctx.execution_options.preserve_order = before
    assert sorted(streams[0]) == list(range(n)) and streams[0] != list(range(n))  # shuffled, all there
    assert streams[0] == streams[1]
