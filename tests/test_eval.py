"""kNN, average precision / mAP and linear probes, against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from rayssl.eval import (
    average_precision,
    knn_top1,
    linear_probe_map,
    linear_probe_top1,
    mean_average_precision,
)
from rayssl.eval.knn import knn_predict


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clusters(n: int, classes: int, dim: int, noise: float, seed: int):
    g = _gen(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g), labels


# --------------------------------------------------------------------------- kNN


def test_knn_separable_is_perfect():
    x, y = _clusters(1200, 6, 32, 0.1, seed=0)
    assert knn_top1(x[:800], y[:800], x[800:], y[800:], k=20) == 1.0


def test_knn_random_labels_is_chance():
    g = _gen(1)
    x = torch.randn(3000, 16, generator=g)
    y = torch.randint(0, 4, (3000,), generator=g)
    acc = knn_top1(x[:2000], y[:2000], x[2000:], y[2000:], k=20)
    assert abs(acc - 0.25) < 0.06


def _knn_brute(train_x, train_y, test_x, k, temperature, num_classes):
    """One test sample at a time, float64, plain Python sorting and voting."""
    tr = train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    preds = []
    for q in test_x.double():
        q = q / q.norm()
        sims = [(float(tr[j] @ q), j) for j in range(len(tr))]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(sim / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,temperature,chunk", [(7, 0.1, 5), (1, 0.07, 1024), (60, 0.5, 8)])
def test_knn_matches_brute_force(k, temperature, chunk):
    g = _gen(2)
    train_x, test_x = torch.randn(50, 8, generator=g) * 3, torch.randn(31, 8, generator=g)
    train_y = torch.randint(0, 4, (50,), generator=g)
    test_y = torch.randint(0, 4, (31,), generator=g)
    ref = _knn_brute(train_x, train_y, test_x, min(k, 50), temperature, 4)
    got = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature,
                      num_classes=4, chunk_size=chunk)
    assert torch.equal(got, ref)
    acc = knn_top1(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                   chunk_size=chunk)
    assert acc == pytest.approx(float((ref == test_y).double().mean()))


def test_knn_is_scale_invariant_and_weights_matter():
    # Cosine: rescaling samples changes nothing.
    x, y = _clusters(300, 3, 16, 0.8, seed=3)
    scale = torch.rand(300, 1, generator=_gen(4)) * 10 + 0.1
    a = knn_predict(x[:200], y[:200], x[200:], k=10)
    b = knn_predict(x[:200] * scale[:200], y[:200], x[200:] * scale[200:], k=10)
    assert torch.equal(a, b)
    # Two neighbours of class 0 far away vs one of class 1 very close: a sharp
    # temperature lets the close one win, a flat one lets the majority win.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    q = torch.tensor([[1.0, 0.3]])
    assert knn_predict(train, labels, q, k=3, temperature=0.05).item() == 1
    assert knn_predict(train, labels, q, k=3, temperature=100.0).item() == 0


def test_knn_rejects_bad_shapes():
    with pytest.raises(ValueError):
        knn_top1(torch.randn(10, 4), torch.zeros(9, dtype=torch.long),
                 torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        knn_top1(torch.randn(10, 4), torch.zeros(10, dtype=torch.long),
                 torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- AP / mAP


def _ap_loop(scores, targets):
    """Precision at each positive's rank, ranks from a plain sort (no ties here)."""
    pairs = sorted(zip(scores.tolist(), targets.tolist()), key=lambda p: -p[0])
    hits, precisions = 0, []
    for rank, (_, t) in enumerate(pairs, start=1):
        if t:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions) if precisions else float("nan")


def test_ap_hand_worked():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    # positives at ranks 1, 3, 5: (1/1 + 2/3 + 3/5) / 3
    assert average_precision(scores, torch.tensor([1, 0, 1, 0, 1])) == pytest.approx(
        (1 + 2 / 3 + 3 / 5) / 3)
    # positives at ranks 2, 5: (1/2 + 2/5) / 2 = 0.45; shuffled rows, same answer
    perm = torch.tensor([3, 0, 4, 1, 2])
    t = torch.tensor([0, 1, 0, 0, 1])
    assert average_precision(scores[perm], t[perm]) == pytest.approx(0.45)
    assert average_precision(scores, torch.tensor([1, 1, 0, 0, 0])) == 1.0


def test_ap_ties_are_order_independent():
    # Tied group {a, b} with one positive: it is credited precision 1/2 (the whole
    # group), then the last positive 2/3 -> (1/2 + 2/3) / 2, whatever the row order.
    expected = (1 / 2 + 2 / 3) / 2
    assert average_precision(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, 1, 1])) == \
        pytest.approx(expected)
    assert average_precision(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1, 0, 1])) == \
        pytest.approx(expected)
    # All scores equal: AP is the positive rate.
    t = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1])
    assert average_precision(torch.zeros(8), t) == pytest.approx(3 / 8)


def test_map_matches_per_class_loop():
    g = _gen(5)
    scores = torch.randn(200, 7, generator=g)
    targets = (torch.rand(200, 7, generator=g) < 0.3).long()
    targets[:, 3] = (scores[:, 3] > 0).long()  # one perfectly ranked class
    expected = sum(_ap_loop(scores[:, c], targets[:, c]) for c in range(7)) / 7
    assert mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)
    assert average_precision(scores[:, 3], targets[:, 3]) == pytest.approx(1.0)
    for c in range(7):
        assert average_precision(scores[:, c], targets[:, c]) == pytest.approx(
            _ap_loop(scores[:, c], targets[:, c]), abs=1e-12)


def test_map_excludes_classes_without_positives():
    g = _gen(6)
    scores = torch.randn(50, 3, generator=g)
    targets = (torch.rand(50, 3, generator=g) < 0.4).long()
    targets[:, 1] = 0
    assert math.isnan(average_precision(scores[:, 1], targets[:, 1]))
    expected = (_ap_loop(scores[:, 0], targets[:, 0]) + _ap_loop(scores[:, 2], targets[:, 2])) / 2
    assert mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="no class"):
        mean_average_precision(scores, torch.zeros_like(targets))


def test_map_random_scores_near_positive_rate():
    g = _gen(7)
    targets = (torch.rand(4000, 5, generator=g) < 0.2).long()
    scores = torch.rand(4000, 5, generator=g)
    assert mean_average_precision(scores, targets) == pytest.approx(0.2, abs=0.03)


def test_map_rejects_bad_input():
    with pytest.raises(ValueError):
        mean_average_precision(torch.randn(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError):
        mean_average_precision(torch.randn(5, 2), torch.full((5, 2), 2))
    with pytest.raises(ValueError):
        mean_average_precision(torch.tensor([[float("nan")]]), torch.ones(1, 1))


# --------------------------------------------------------------------------- linear


def _multilabel(n: int, dim: int, classes: int, seed: int):
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g) * 5 + 2  # standardisation must handle offset/scale
    w = torch.randn(dim, classes, generator=g)
    logits = (x - 2) @ w
    return x, (logits > logits.quantile(0.7, dim=0)).float()


def test_linear_probe_map_separable():
    x, y = _multilabel(2000, 32, 10, seed=8)
    assert linear_probe_map(x[:1000], y[:1000], x[1000:], y[1000:]) > 0.9


def test_linear_probe_map_random_features_near_baseline():
    g = _gen(9)
    x = torch.randn(2000, 64, generator=g)
    y = (torch.rand(2000, 8, generator=g) < 0.25).float()
    m = linear_probe_map(x[:1000], y[:1000], x[1000:], y[1000:])
    assert abs(m - float(y[1000:].mean())) < 0.06


def test_linear_probe_deterministic_and_one_step_an_epoch_when_it_fits(monkeypatch):
    g = _gen(10)
    x = torch.randn(2000, 512, generator=g)
    y = (torch.rand(2000, 12, generator=g) < 0.3).float()
    steps = []
    adam_step = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    a = linear_probe_map(x[:1000], y[:1000], x[1000:], y[1000:], seed=3)
    assert len(steps) == 100  # full batch: one Adam step an epoch (the default 100), what keeps it cheap
    assert linear_probe_map(x[:1000], y[:1000], x[1000:], y[1000:], seed=3) == a
    # Mini-batches: order comes from the seed, so the seed now matters and repeats.
    kw = dict(batch_size=100, epochs=3)
    steps.clear()
    b1 = linear_probe_map(x[:1000], y[:1000], x[1000:], y[1000:], seed=1, **kw)
    assert len(steps) == 3 * 10  # 10 batches of 100 an epoch
    assert linear_probe_map(x[:1000], y[:1000], x[1000:], y[1000:], seed=1, **kw) == b1
    assert linear_probe_map(x[:1000], y[:1000], x[1000:], y[1000:], seed=2, **kw) != b1


def test_linear_probe_top1():
    x, y = _clusters(1500, 5, 24, 0.5, seed=11)
    assert linear_probe_top1(x[:1000], y[:1000], x[1000:], y[1000:]) > 0.95
    g = _gen(12)
    yr = torch.randint(0, 5, (1500,), generator=g)
    acc = linear_probe_top1(torch.randn(1500, 24, generator=g)[:1000], yr[:1000],
                            torch.randn(500, 24, generator=g), yr[1000:])
    assert abs(acc - 0.2) < 0.07


def test_features_on_a_cpu_go_64_images_a_pass_and_equal_those_of_one_large_batch():
    """The default batch of ``extract_features`` on a CPU (``CPU_FEATURE_BATCH``: 256 images'
    activations are mapped and page-faulted anew by malloc every batch) changes how many passes
    run, not the features: eval mode, so no image's feature depends on its batch-mates."""
    import numpy as np

    from rayssl.eval.features import CPU_FEATURE_BATCH, extract_features
    from rayssl.modules.backbone import build_backbone

    torch.manual_seed(0)
    net, _ = build_backbone("resnet18", small_stem=True)
    images = np.random.default_rng(0).integers(0, 256, size=(150, 40, 40, 3), dtype=np.uint8)
    sizes: list[int] = []
    net.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    default = extract_features(net, images, 32, "cpu", precision="fp32")
    assert CPU_FEATURE_BATCH == 64 and sizes == [64, 64, 22]
    one = extract_features(net, images, 32, "cpu", batch_size=150, precision="fp32")
    assert sizes[3:] == [150] and net.training  # the mode is restored
    torch.testing.assert_close(default, one, rtol=1e-4, atol=1e-5)
