"""Label tables and class folders: which classes each image has, never one image's label lost to another's."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import image_bytes
from rayssl.data.labels import folder_labels, load_labels
from rayssl.data.sources import DataError
from rayssl.eval.evaluate import EvalError, EvalRequest, open_sources
from rayssl.storage import S3Options


def _tree(root, names_by_class: dict[str, list[str]]):
    """root/<class>/<name>, each a different image; returns {path: class}."""
    made, seed = {}, 0
    for cls, names in names_by_class.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            (root / cls / name).write_bytes(image_bytes(seed, 16, fmt="JPEG"))
            made[str(root / cls / name)], seed = cls, seed + 1
    return made


def test_labels_from_csv_parquet_and_imagefolder(tmp_path):
    (tmp_path / "labels.csv").write_text("id,classes,dominant\nscene-000001,star|ring,star\nimg/2.png,cat,cat\n")
    assert load_labels(str(tmp_path / "labels.csv")) == {"scene-000001": ("star", "ring"), "2": ("cat",)}
    pq.write_table(pa.table({"key": ["a", "b"], "labels": [["x", "y"], ["z"]]}), tmp_path / "l.parquet")
    assert load_labels(str(tmp_path / "l.parquet")) == {"a": ("x", "y"), "b": ("z",)}
    _tree(tmp_path / "tree", {"cat": ["cat1.jpg"], "dog": ["dog1.jpg"]})
    assert load_labels(str(tmp_path / "tree")) == {"cat1": ("cat",), "dog1": ("dog",)}


def test_a_table_with_a_row_per_class_adds_them_up_and_one_stem_for_two_images_is_refused(tmp_path):
    (tmp_path / "rows.csv").write_text("id,label\na.jpg,cat\nb.jpg,dog\na.jpg,sofa\na.jpg,cat\n")
    assert load_labels(str(tmp_path / "rows.csv")) == {"a": ("cat", "sofa"), "b": ("dog",)}
    pq.write_table(pa.table({"path": ["x/a.jpg", "x/a.jpg"], "label": ["cat", "dog"]}), tmp_path / "rows.parquet")
    assert load_labels(str(tmp_path / "rows.parquet")) == {"a": ("cat", "dog")}

    # Two different images whose file names match one stem: which label is whose cannot be told.
    (tmp_path / "clash.csv").write_text("path,label\ncat/0001.jpg,cat\ndog/0001.jpg,dog\n")
    with pytest.raises(DataError, match=r"'cat/0001.jpg' and 'dog/0001.jpg' have the same file stem '0001'"):
        load_labels(str(tmp_path / "clash.csv"))
    _tree(tmp_path / "tree", {"cat": ["0001.jpg"], "dog": ["0001.jpg", "0002.jpg"]})
    with pytest.raises(DataError, match=r"'cat/0001' and 'dog/0001' have the same file stem '0001'"):
        load_labels(str(tmp_path / "tree"))


def test_class_folders_give_each_image_its_own_folder_even_where_file_names_repeat(tmp_path):
    made = _tree(tmp_path / "tree", {"cat": ["0.jpg", "1.jpg"], "dog": ["0.jpg"], "sofa": ["1.jpg", "x.v2.jpg"]})
    (tmp_path / "tree" / "top.jpg").write_bytes(image_bytes(99, 16, fmt="JPEG"))  # in no class folder
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("not an image")
    paths = [str(p) for p in (tmp_path / "tree").rglob("*") if p.is_file()]
    found = folder_labels("tree", str(tmp_path / "tree") + "/", paths)
    assert {p: cls for p, (_, cls) in found.items()} == made
    assert {i for i, _ in found.values()} == {"cat/0", "cat/1", "dog/0", "sofa/1", "sofa/x"}
    with pytest.raises(DataError, match="no images in class folders"):
        folder_labels("flat", str(tmp_path), [str(tmp_path / "a.jpg")])

    # rayssl eval --data TREE (labels: its own folders, however the same place is written) takes them all.
    for labels in (None, str(tmp_path / "tree") + "/", f"file://{tmp_path / 'tree'}"):
        source = open_sources(EvalRequest(data=str(tmp_path / "tree"), labels=labels), S3Options()).train
        assert {p: source.labels[i] for p, i in source.ids_by_path.items()} == {p: (c,) for p, c in made.items()}

    # Matched to a table by file stem instead, the repeated names cannot be told apart: one line says so.
    (tmp_path / "labels.csv").write_text("id,label\n0,cat\n1,cat\nx,sofa\n")
    with pytest.raises(EvalError, match=r"--data .*two images share the id '0' .* matched to --labels"):
        open_sources(EvalRequest(data=str(tmp_path / "tree"), labels=str(tmp_path / "labels.csv")), S3Options())
