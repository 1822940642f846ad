"""``python -m rayssl.viz cdul-labels`` on a tiny CDUL run built without Ray.

The label table is made by the labelling job's own scene loader and CLIP labeller (a tiny CLIP
trained for two steps) and written as Parquet + pseudolabels.json; the CDUL checkpoint holds a
real CDUL module whose label store took two gradient-alignment steps, saved by the real
checkpoint writer in a run directory. The picture's labels are checked against both.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import write_random_checkpoint
from rayssl.checkpoint import load_shared_state, write_rank_state, write_shared_state
from rayssl.data.scenes import SHAPES
from rayssl.cli import viz as viz_cli

CLASSES = list(SHAPES)  # the job's default for --data scenes (its ground-truth column assumes it)
NUM_SCENES, MISSING, SIZE = 24, 5, 32  # scene MISSING is not in the table (as if skipped)


def _save(directory, state: dict) -> str:
    directory.mkdir(parents=True)
    size = write_rank_state(directory, 0, {"method": {}, "rng": None})
    write_shared_state(directory, state, world_size=1, rank_sizes=[size])
    return str(directory)


@pytest.fixture(scope="module")
def cdul_run(tmp_path_factory):
    import pyarrow.parquet as pq

    from rayssl.config import Config
    from rayssl.data.scenes import generate_batch
    from rayssl.methods.cdul import CDUL
    from rayssl.pseudolabel.job import ClipLabeller, load_scenes
    from rayssl.data.pseudo_labels import scenes_source, write_meta
    from rayssl.pseudolabel.tiny_clip import train_tiny_clip

    root = tmp_path_factory.mktemp("cdul")
    clip = root / "tiny_clip.pt"
    train_tiny_clip(str(clip), steps=2, seconds=30, batch_size=8, num_scenes=16)
    labeller = ClipLabeller("rayssl-tiny-clip", str(clip), CLASSES, "a photo of a {}", grid=2, gamma=0.0, lam=0.0,
                            keep_vectors=False)
    ids = np.asarray([i for i in range(NUM_SCENES) if i != MISSING])
    labels = root / "labels"
    labels.mkdir()
    for part, chunk in enumerate((ids[12:], ids[:12])):  # two files, not in index order (as Ray may write)
        batch = load_scenes({"id": chunk}, seed=0, size=SIZE, side=2 * labeller.clip.image_size)
        pq.write_table(labeller(batch), labels / f"part-{part}.parquet")
    write_meta(str(labels), {
        "classes": CLASSES, "template": "a photo of a {}", "grid": 2, "gamma": 0.0, "lam": 0.0,
        "clip_model": "rayssl-tiny-clip", "clip_pretrained": clip.name, "num_rows": NUM_SCENES,
        "source": scenes_source(0, SIZE, NUM_SCENES)})

    cfg = Config.from_dict({
        "run": {"method": "cdul", "num_workers": 1, "batch_size": 8},
        "model": {"backbone": "resnet18", "small_stem": True},
        "data": {"crop_sizes": [SIZE], "crop_counts": [2], "min_scale": [0.5], "max_scale": [1.0]},
        "cdul": {"pseudo_labels": str(labels), "label_warmup_epochs": 0, "label_lr": 4.0}})
    torch.manual_seed(0)
    model = CDUL(cfg.method, cfg.model, num_crops=2, world_size=1)
    for chunk in (ids[:8], ids[8:16]):  # two update steps on 16 of the 23 labelled scenes
        x = torch.from_numpy(generate_batch(chunk, seed=0, size=SIZE)["image"]).permute(0, 3, 1, 2).float() / 255
        model([x, x.flip(3)], epoch=0, index=torch.from_numpy(chunk))
    assert model.store.updates == 2
    state = {"method": "cdul", "model": model.state_dict(), "optimizer": {}, "epoch": 1, "step": 2,
             "images_seen": 16, "world_size": 1, "config": cfg.to_dict(),
             "method_state": model.shared_state_dict()}
    run = root / "run"
    ckpt = _save(run / "checkpoint_2026-01-01_00-00-00.000000", state)
    return {"root": root, "labels": str(labels), "run": str(run), "ckpt": ckpt}


def _cli(argv, capsys) -> tuple[int, dict | None, str]:
    rc = viz_cli.main(["cdul-labels", *argv])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out.strip().splitlines()[-1]) if rc == 0 else None), cap.err


def _expected_top(scores: np.ndarray, top: int) -> list[tuple[str, float]]:
    order = sorted(range(len(scores)), key=lambda c: (-scores[c], c))[:top]
    return [(CLASSES[c], float(scores[c])) for c in order]


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_cdul_labels_draws_the_table_and_the_store_for_the_most_changed_images(cdul_run, capsys):
    from rayssl.data.scenes import generate_scene
    from rayssl.data.pseudo_labels import read_pseudo_labels

    _, cols = read_pseudo_labels(cdul_run["labels"])
    initial = {int(i): s for i, s in zip(cols["index"], cols["soft_label"])}
    store = load_shared_state(cdul_run["ckpt"])["method_state"]["label_store"]
    final = torch.sigmoid(store["latent"].float()).numpy()
    change = {i: float(np.abs(final[i].astype(np.float64) - initial[i]).sum()) for i in initial}
    assert MISSING not in initial and not bool(store["known"][MISSING])

    out = cdul_run["root"] / "labels.png"
    rc, summary, err = _cli(["--checkpoint", cdul_run["run"], "--n", "3", "--top", "2", "--out", str(out)], capsys)
    assert rc == 0, err
    # --select changed (default): the 3 images whose soft labels moved most, most first.
    assert summary["index"] == sorted(change, key=lambda i: (-change[i], i))[:3]
    assert summary["images"] == 3 and summary["label_updates"] == 2
    assert summary["pseudo_labels"] == cdul_run["labels"]  # the path the run recorded
    for r, i in enumerate(summary["index"]):
        assert summary["id"][r] == f"scene-0-{i}"
        for drawn, want in ((summary["before"][r], _expected_top(initial[i], 2)),
                            (summary["after"][r], _expected_top(final[i], 2))):
            assert [n for n, _ in drawn] == [n for n, _ in want]
            assert [s for _, s in drawn] == pytest.approx([s for _, s in want], abs=1e-6)
        assert summary["truth"][r] == [c for c in CLASSES if c in generate_scene(i, seed=0, size=SIZE).classes]
    moved = [i for i in change if change[i] > 1e-3]
    assert len(moved) == 16 and set(summary["index"]) <= set(moved)  # the 16 updated scenes
    w3, h3 = _png_size(out)

    # --select random with an explicit --pseudo-labels: another draw, one row per image.
    out5 = cdul_run["root"] / "labels5.png"
    rc, summary, err = _cli(["--checkpoint", cdul_run["ckpt"], "--pseudo-labels", cdul_run["labels"], "--n", "5",
                             "--select", "random", "--seed", "1", "--out", str(out5)], capsys)
    assert rc == 0, err
    candidates = np.asarray(sorted(initial))
    assert summary["index"] == candidates[np.random.default_rng(1).permutation(len(candidates))[:5]].tolist()
    assert all(len(row) == 3 for row in summary["before"] + summary["after"])  # --top 3 (default)
    w5, h5 = _png_size(out5)
    assert w5 == pytest.approx(w3, abs=40)  # same 3 columns
    assert h5 - h3 == pytest.approx((h3 - 40) * 2 / 3, rel=0.25)  # 2 more rows of the same height
    assert h5 > w5  # 5 rows of 3 columns


def test_cdul_labels_bad_input_is_one_line_and_writes_nothing(cdul_run, capsys, tmp_path):
    def refused(argv, match):
        out = tmp_path / "x.png"
        rc, _, err = _cli([*argv, "--out", str(out)], capsys)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("python -m rayssl.viz: error: "), err
        assert match in err, err
        assert not out.exists() and not list(tmp_path.glob(".x.png*"))
        return err

    write_random_checkpoint(tmp_path / "swav", "swav", crop_size=32, num_prototypes=8,
                            projection_hidden_dim=16, projection_dim=8)
    refused(["--checkpoint", str(tmp_path / "swav")], "need a CDUL checkpoint, got swav")
    refused(["--checkpoint", cdul_run["run"], "--pseudo-labels", str(tmp_path / "nope")],
            f"--pseudo-labels: {tmp_path / 'nope'} holds no pseudolabels.json")
    refused(["--checkpoint", cdul_run["run"], "--top", "13"], "--top: must be <= 12")
    refused(["--checkpoint", str(tmp_path / "missing-run")], "does not exist")

    state = load_shared_state(cdul_run["ckpt"])
    state["config"]["cdul"]["pseudo_labels"] = str(tmp_path / "moved")
    err = refused(["--checkpoint", _save(tmp_path / "moved-ckpt", state)],
                  f"cdul.pseudo_labels (recorded by the run): {tmp_path / 'moved'} holds no pseudolabels.json")
    assert err.rstrip().endswith("pass --pseudo-labels URI if the labels moved")
    state["method_state"]["label_store"]["updates"] = 0
    refused(["--checkpoint", _save(tmp_path / "no-update-ckpt", state), "--pseudo-labels", cdul_run["labels"]],
            "its labels were never updated")

    # --out: a path under a file, or an existing file without --overwrite, is refused before any work.
    (tmp_path / "file.txt").write_text("x")
    rc, _, err = _cli(["--checkpoint", cdul_run["run"], "--out", str(tmp_path / "file.txt" / "a.png")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "is not a directory" in err
    rc, _, err = _cli(["--checkpoint", cdul_run["run"], "--out", str(tmp_path / "file.txt")], capsys)
    assert rc == 2 and "already exists" in err and (tmp_path / "file.txt").read_text() == "x"
