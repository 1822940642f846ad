"""The shard writer: WebDataset and Parquet shards written by Ray tasks, never overwritten by accident."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from conftest import image_bytes
from rayssl.cli import shards
from rayssl.data.shards import ShardTask, write_one_shard
from rayssl.data.labels import load_labels
from rayssl.data.scenes import SHAPES, generate_scene, split_seed
from rayssl.data.sources import count_samples, resolve_source
from rayssl.data.tar import iter_tar_samples


def test_folder_to_webdataset_shards_keeps_bytes_and_refuses_to_overwrite(ray_session, tmp_path, capsys):
    src = tmp_path / "images"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
    originals = {}
    for i in range(5):
        path = src / ("cat" if i < 3 else "dog") / f"img{i}.png"
        path.write_bytes(image_bytes(i))
        originals[f"img{i}"] = path.read_bytes()
    (src / "dog" / "broken.jpg").write_bytes(b"not a jpeg")  # copied as is: training judges it
    out = tmp_path / "shards"
    argv = ["--source", str(src), "--out", str(out), "--format", "webdataset", "--shard-size", "4",
            "--labels", str(src)]
    assert shards.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 2] and manifest["num_samples"] == 6

    samples = []
    for name in ("train-000000.tar", "train-000001.tar"):
        with open(out / name, "rb") as f:
            samples += list(iter_tar_samples(f))
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["broken"]["jpg"] == b"not a jpeg"
    for key, data in originals.items():
        assert by_key[key]["png"] == data
    meta = json.loads(by_key["img4"]["json"])
    assert meta == {"classes": ["dog"], "path": "dog/img4.png"}

    source = resolve_source(str(out))
    assert source.kind == "webdataset" and source.manifest["num_samples"] == 6
    assert count_samples(source) == 6
    (out / "manifest.json").unlink()  # without a manifest the tar headers are counted
    assert count_samples(resolve_source(str(out))) == 6

    # A second run into the same place is refused, naming the place; nothing is touched.
    before = (out / "train-000000.tar").stat().st_mtime_ns
    assert shards.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds 3 file(s) of 'train' shards" in err and str(out) in err and "--overwrite" in err
    assert (out / "train-000000.tar").stat().st_mtime_ns == before

    # --overwrite with a larger shard size: the stale second shard must not survive.
    assert shards.main([*argv[:-4], "--shard-size", "10", "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar"]


def test_class_folders_that_repeat_file_names_label_each_file_by_its_own_folder(ray_session, tmp_path, capsys):
    src = tmp_path / "images"
    made = {"cat/0001.png": 0, "cat/0002.png": 1, "dog/0001.png": 2, "sofa/0002.png": 3}
    for rel, seed in made.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(image_bytes(seed))
    out = tmp_path / "shards"
    assert shards.main(["--source", str(src), "--out", str(out), "--shard-size", "3", "--labels", str(src)]) == 0
    capsys.readouterr()
    samples = []
    for name in ("train-000000.tar", "train-000001.tar"):
        with open(out / name, "rb") as f:
            samples += list(iter_tar_samples(f))
    meta = {json.loads(s["json"])["path"]: (json.loads(s["json"])["classes"], s["png"]) for s in samples}
    assert meta == {rel: ([rel.split("/")[0]], (src / rel).read_bytes()) for rel in made}
    # The labels also go to a table beside the shards, by sample key, named in the manifest.
    assert json.loads((out / "manifest.json").read_text())["labels"] == "train-labels.csv"
    table = load_labels(str(out / "train-labels.csv"))
    assert table == {s["__key__"]: (json.loads(s["json"])["path"].split("/")[0],) for s in samples}

    # Another tree as the labels is matched by file stem: its repeated names are one line, before any shard.
    assert shards.main(["--source", str(src), "--out", str(tmp_path / "other"), "--shard-size", "3",
                        "--labels", f"{src}/"]) == 0  # the same place, written otherwise
    capsys.readouterr()
    (tmp_path / "copy").mkdir()
    for d in ("cat", "dog"):
        (src / d).rename(tmp_path / "copy" / d)
    assert shards.main(["--source", str(src), "--out", str(tmp_path / "refused"), "--shard-size", "3",
                        "--labels", str(tmp_path / "copy")]) == 2
    assert "'cat/0001' and 'dog/0001' have the same file stem '0001'" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_scenes_to_parquet_shards_carry_labels(ray_session, tmp_path, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "pq"
    assert shards.main(["--source", "scenes", "--out", str(out), "--format", "parquet", "--shard-size", "5",
                        "--num-scenes", "12", "--scene-size", "32", "--seed", "3"]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "train-000000.parquet", "train-000001.parquet", "train-000002.parquet",
                     "train-labels.csv"]
    table = pq.read_table(out / "train-000002.parquet")
    assert table.column_names == ["key", "image", "classes", "dominant", "label", "caption"]
    assert table.column("key").to_pylist() == ["scene-000010", "scene-000011"]
    scene = generate_scene(11, seed=split_seed(3, "train"), size=32)  # the built-in training stream
    row = table.slice(1, 1).to_pylist()[0]
    assert tuple(row["classes"]) == scene.classes and row["dominant"] == scene.dominant
    assert row["label"] == SHAPES.index(scene.dominant) and row["caption"] == scene.caption
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), scene.image)  # PNG: lossless
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scenes"]["classes"] == list(SHAPES) and manifest["num_samples"] == 12
    assert manifest["labels"] == "train-labels.csv"  # each scene's classes by key, as the shards hold them
    rows = [r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f, columns=["key", "classes"]).to_pylist()]
    assert load_labels(str(out / "train-labels.csv")) == {r["key"]: tuple(r["classes"]) for r in rows}
    assert count_samples(resolve_source(str(out))) == 12


def test_webdataset_members_follow_the_convention(tmp_path):
    """No Ray: one shard written inline has <key>.png/.json/.cls/.txt per scene."""
    import fsspec

    task = ShardTask("train-000000.tar", str(tmp_path / "s.tar"), "webdataset", indices=[0, 1])
    name, n, labelled = write_one_shard(task, fsspec.filesystem("file"), size=32)
    assert (name, n) == ("train-000000.tar", 2)
    assert labelled == [(f"scene-00000{i}", list(generate_scene(i, seed=split_seed(0, "train"), size=32).classes))
                        for i in (0, 1)]
    with tarfile.open(tmp_path / "s.tar") as tf:
        names = tf.getnames()
    assert names == [f"scene-00000{i}.{e}" for i in (0, 1) for e in ("png", "json", "cls", "txt")]
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary name is gone


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert shards.main(["--source", "scenes", "--out", str(tmp_path / "x"), "--shard-size", "0",
                        "--num-scenes", "4"]) == 2
    assert "--shard-size: must be >= 1" in capsys.readouterr().err
    assert shards.main(["--source", "scenes", "--out", str(tmp_path / "x"), "--shard-size", "4"]) == 2
    assert "--num-scenes: must be >= 1" in capsys.readouterr().err
    assert shards.main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "x"),
                        "--shard-size", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err
