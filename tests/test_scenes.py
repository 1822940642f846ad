"""The built-in scenes generator: determinism, labels, balance, files and CLI."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayssl.data.scenes import (
    COLOURS,
    SHAPES,
    SPLITS,
    Scene,
    generate_batch,
    generate_scene,
    scenes_from_range_batch,
    split_seed,
    write_image_folder,
)

REPO = Path(__file__).resolve().parents[1]
PHRASE = re.compile(r"an? (\w+) (\w+)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def many() -> list[Scene]:
    return [generate_scene(i, seed=0, size=32) for i in range(600)]


def test_same_arguments_give_identical_bytes():
    a, b = generate_scene(7, seed=3, size=64), generate_scene(7, seed=3, size=64)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.classes, a.dominant, a.caption) == (b.classes, b.dominant, b.caption)


def test_identical_bytes_in_another_process():
    digest = hashlib.sha256(b"".join(generate_scene(i, seed=5).image.tobytes()
                                     for i in range(4))).hexdigest()
    code = ("import hashlib; from rayssl.data.scenes import generate_scene; "
            "print(hashlib.sha256(b''.join(generate_scene(i, seed=5).image.tobytes() "
            "for i in range(4))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=60, check=True)
    assert out.stdout.strip() == digest


def test_global_rng_state_neither_used_nor_disturbed():
    np.random.seed(1)
    before = np.random.get_state()[1].copy()
    a = generate_scene(2).image
    assert np.array_equal(np.random.get_state()[1], before)
    np.random.seed(999)
    assert np.array_equal(generate_scene(2).image, a)


def test_different_index_or_seed_differ():
    base = generate_scene(0, seed=0).image
    assert not np.array_equal(base, generate_scene(1, seed=0).image)
    assert not np.array_equal(base, generate_scene(0, seed=1).image)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_image_shape_and_dtype(size):
    s = generate_scene(3, size=size)
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.image.std() > 5  # not a blank canvas


def test_labels_do_not_depend_on_size():
    # The layout is drawn in relative units: one (index, seed) is the same scene at
    # every resolution, only rasterised differently.
    for i in range(40):
        a, b = generate_scene(i, seed=4, size=32), generate_scene(i, seed=4, size=80)
        assert (a.classes, a.dominant, a.caption) == (b.classes, b.dominant, b.caption)


def test_bad_arguments_fail_fast():
    with pytest.raises(ValueError):
        generate_scene(-1)
    with pytest.raises(ValueError):
        generate_scene(0, size=8)


def test_labels_and_captions_are_consistent(many):
    colours = set(COLOURS)
    for s in many:
        assert 1 <= len(s.classes) <= 4
        assert list(s.classes) == sorted(set(s.classes))
        assert set(s.classes) <= set(SHAPES)
        assert s.dominant in s.classes
        phrases = PHRASE.findall(s.caption)
        # One "a <colour> <shape>" phrase per object, the dominant one first.
        assert len(phrases) == len(s.classes), s.caption
        assert sorted(shape for _, shape in phrases) == list(s.classes)
        assert all(colour in colours for colour, _ in phrases)
        assert phrases[0][1] == s.dominant
        for name in s.classes:
            assert name in s.caption


def test_object_counts_cover_one_to_four(many):
    counts = Counter(len(s.classes) for s in many)
    assert set(counts) == {1, 2, 3, 4}
    assert min(counts.values()) > 0.15 * len(many)


def test_all_shapes_appear_and_dominants_are_balanced(many):
    present = Counter(c for s in many for c in s.classes)
    assert set(present) == set(SHAPES)
    dominant = Counter(s.dominant for s in many)
    assert set(dominant) == set(SHAPES)
    assert min(dominant.values()) >= 0.03 * len(many)


def test_dominant_object_covers_the_most_pixels():
    # The dominant object is the largest and drawn on top, so more pixels carry its
    # (named, lightly jittered) colour than any other object's colour.
    wins, total = 0, 0
    for i in range(150):
        s = generate_scene(i, seed=11, size=64)
        phrases = PHRASE.findall(s.caption)
        if len(phrases) < 2:
            continue
        img = s.image.astype(np.float32)
        px = [(np.linalg.norm(img - np.asarray(COLOURS[c], np.float32), axis=-1) < 40).sum()
              for c, _ in phrases]
        total += 1
        wins += px[0] > max(px[1:])
    assert total > 80 and wins >= 0.95 * total


def test_objects_use_distinct_colours(many):
    for s in many[:200]:
        colours = [c for c, _ in PHRASE.findall(s.caption)]
        assert len(colours) == len(set(colours))


def test_generate_batch_columns(many):
    idx = np.arange(20, 30)
    batch = generate_batch(idx, seed=0, size=32)
    assert set(batch) == {"key", "image", "label", "labels", "caption", "place"}
    assert batch["place"].dtype == np.float32 and batch["place"].shape == (10, 3)
    assert batch["image"].shape == (10, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int64 and batch["label"].shape == (10,)
    assert batch["labels"].dtype == np.uint8 and batch["labels"].shape == (10, len(SHAPES))
    for j, i in enumerate(idx):
        s = many[i]
        assert batch["key"][j] == f"scene-0-{i}"
        assert np.array_equal(batch["image"][j], s.image)
        assert SHAPES[batch["label"][j]] == s.dominant
        assert {SHAPES[c] for c in np.flatnonzero(batch["labels"][j])} == set(s.classes)
        assert batch["caption"][j] == s.caption
        assert np.allclose(batch["place"][j], s.dominant_place)
    assert batch["labels"][np.arange(10), batch["label"]].all()


def test_generate_batch_empty():
    batch = generate_batch([], size=32)
    assert batch["image"].shape == (0, 32, 32, 3)
    assert batch["labels"].shape == (0, len(SHAPES))
    assert len(batch["key"]) == len(batch["caption"]) == 0


def test_scenes_from_range_batch_matches_generate_batch():
    out = scenes_from_range_batch({"id": np.arange(5, 9, dtype=np.int64)}, seed=2, size=32)
    ref = generate_batch([5, 6, 7, 8], seed=2, size=32)
    assert np.array_equal(out["image"], ref["image"])
    assert list(out["key"]) == [f"scene-2-{i}" for i in range(5, 9)]
    with pytest.raises(KeyError):
        scenes_from_range_batch({"item": np.arange(3)})


def test_split_seeds_are_distinct_and_held_out():
    for seed in (0, 1, 7, 2**32 - 1):
        seeds = [split_seed(seed, s) for s in SPLITS]
        assert len(set(seeds)) == 3
        assert split_seed(seed, "train") == seed
        # Evaluation streams live above every valid training seed.
        assert all(x >= 2**32 for x in seeds[1:])
    assert split_seed(3, "eval-test") == split_seed(3, "eval-test")
    assert split_seed(3, "eval-test") != split_seed(4, "eval-test")
    train = generate_scene(0, split_seed(0, "train")).image
    test = generate_scene(0, split_seed(0, "eval-test")).image
    assert not np.array_equal(train, test)
    with pytest.raises(ValueError):
        split_seed(0, "validation")
    with pytest.raises(ValueError):
        split_seed(2**32, "train")


def _read_labels(path: Path) -> list[dict[str, str]]:
    with open(path / "labels.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["id", "classes", "dominant", "caption"]
        return list(reader)


@pytest.mark.parametrize("layout", ["flat", "imagefolder"])
def test_write_image_folder_round_trip(tmp_path, layout):
    out = write_image_folder(tmp_path / "ds", n=6, seed=1, size=32, layout=layout,
                             split="eval-train")
    rows = _read_labels(out)
    assert [r["id"] for r in rows] == [f"scene-{i:06d}" for i in range(6)]
    stream = split_seed(1, "eval-train")
    for i, row in enumerate(rows):
        s = generate_scene(i, seed=stream, size=32)
        folder = out / s.dominant if layout == "imagefolder" else out
        with Image.open(folder / f"{row['id']}.png") as im:
            assert im.mode == "RGB"
            assert np.array_equal(np.asarray(im), s.image)  # PNG is lossless
        assert row["classes"].split("|") == list(s.classes)
        assert row["dominant"] == s.dominant and row["caption"] == s.caption
    n_images = len(list(out.rglob("*.png")))
    assert n_images == 6


def test_write_jpg(tmp_path):
    out = write_image_folder(tmp_path / "jpg", n=2, size=32, fmt="jpg")
    with Image.open(out / "scene-000001.jpg") as im:
        got = np.asarray(im).astype(int)
    ref = generate_scene(1, size=32).image.astype(int)
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 12


def test_write_refuses_non_empty_dir(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    precious = target / "mine.txt"
    precious.write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_image_folder(target, n=2, size=32)
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]
    write_image_folder(target, n=2, size=32, overwrite=True)
    assert precious.read_text() == "keep me"  # overwrite replaces, never deletes
    assert (target / "scene-000001.png").exists()
    # An existing empty directory is fine.
    (tmp_path / "empty").mkdir()
    write_image_folder(tmp_path / "empty", n=1, size=32)


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "rayssl.data.scenes", "--help"],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert out.returncode == 0
    for flag in ("--out", "--n", "--size", "--seed", "--format", "--layout", "--overwrite"):
        assert flag in out.stdout


def test_cli_writes_and_refuses(tmp_path):
    cmd = [sys.executable, "-m", "rayssl.data.scenes", "--out", str(tmp_path / "cli"),
           "--n", "5", "--size", "32", "--layout", "imagefolder"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert first.returncode == 0, first.stderr
    rows = _read_labels(tmp_path / "cli")
    assert len(rows) == 5
    for row in rows:
        assert (tmp_path / "cli" / row["dominant"] / f"{row['id']}.png").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert again.returncode != 0 and "not empty" in again.stderr
