"""The feature probes (``rayssl.eval.probes``, run on checkpoints by experiments/feature_probes.py):
attribute labels against the generator's own columns, and a probe that must find the one
attribute a hand-built feature encodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayssl.data.scenes import COLOURS, SHAPES, generate_batch
from rayssl.eval.features import scenes_eval_sets

from rayssl.eval import probes as fp

from experiments_loader import load_experiment


def test_labels_agree_with_the_generators_columns():
    scenes = generate_batch(range(200), seed=3, size=32)
    edges = fp.quantile_edges(scenes)
    labels = fp.attribute_labels(scenes, edges)
    colours = list(COLOURS)
    for i in range(200):
        objects = fp.caption_objects(str(scenes["caption"][i]))
        # The caption lists the dominant object first: its shape is the "label" column, and
        # the shapes it names are exactly the multi-hot "labels" column.
        assert objects[0][1] == SHAPES[scenes["label"][i]]
        assert {s for _, s in objects} == {SHAPES[j] for j in np.flatnonzero(scenes["labels"][i])}
        assert 1 <= len(objects) <= 4 and labels["objects"][i] == len(objects) - 1
        assert colours[labels["colour"][i]] == objects[0][0]
    assert torch.equal(labels["shape"], torch.from_numpy(scenes["label"]))
    # Quartiles of the set they were computed on split it into four near-equal parts.
    assert np.bincount(labels["brightness"].numpy(), minlength=4).tolist() == [50, 50, 50, 50]
    assert set(labels["hue"].tolist()) <= set(range(6))
    assert len(set(labels["objects"].tolist())) == 4 and len(set(labels["colour"].tolist())) > 5
    # The dominant object's place: drawn in relative units, so the same at every size; inside
    # the generator's ranges; its grid cell and radius tercile follow from it.
    place = scenes["place"].astype(np.float64)
    assert np.array_equal(place, generate_batch(range(200), seed=3, size=64)["place"].astype(np.float64))
    x, y, r = place.T
    assert ((0.18 <= r) & (r <= 0.26)).all()
    assert ((0.9 * r - 1e-6 <= x) & (x <= 1 - 0.9 * r + 1e-6) & (0.9 * r - 1e-6 <= y) & (y <= 1 - 0.9 * r + 1e-6)).all()
    cells = [int(3 * y[i]) * 3 + int(3 * x[i]) for i in range(200)]
    assert labels["place"].tolist() == cells and len(set(cells)) == 9
    assert sorted(np.bincount(labels["size"].numpy(), minlength=3).tolist()) == [66, 67, 67]


def test_caption_parts_that_do_not_parse_are_refused():
    with pytest.raises(ValueError, match="unexpected scene caption part 'a mauve star'"):
        fp.caption_objects("a red ring and a mauve star")


class BrightnessOnly(torch.nn.Module):
    """A 'backbone' whose feature is the image's mean brightness, as an angle in [0, pi/2]:
    cosine similarity then falls with the brightness difference and with nothing else."""

    def forward(self, x):
        b = x.mean(dim=(1, 2, 3))
        theta = (b - b.new_tensor(-2.2)) / 4.9 * (math.pi / 2)  # normalised inputs lie in about [-2.2, 2.7]
        return torch.stack([theta.cos(), theta.sin()], dim=1)


def test_the_probe_finds_what_the_features_encode_and_nothing_else():
    sets = scenes_eval_sets(0, 32, 400, 200)
    edges = fp.quantile_edges(sets[0])
    labels = (fp.attribute_labels(sets[0], edges), fp.attribute_labels(sets[1], edges))
    got = fp.probe(BrightnessOnly(), sets, labels, 32, k=10)
    assert set(got) == set(fp.ATTRIBUTES)
    assert got["brightness"] > 0.8  # images and labels line up
    assert got["shape"] < 0.25  # 12 shapes: brightness says almost nothing about them
    # The same through probe_scenes, beside each attribute's majority share.
    r = fp.probe_scenes({"b": BrightnessOnly()}, 32, seed=0, num_train=400, num_test=200, k=10)
    assert r["probes"]["b"] == got and set(r["majority"]) == set(fp.ATTRIBUTES)
    assert r["majority"]["brightness"] == pytest.approx(
        np.bincount(labels[1]["brightness"].numpy()).max() / 200)


def test_a_path_that_is_no_checkpoint_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        load_experiment("feature_probes").main([str(tmp_path)])
    assert exc.value.code == 2
    assert "not a rayssl checkpoint" in capsys.readouterr().err
