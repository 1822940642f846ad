"""CDUL (pure torch, no Ray): pseudo-label formulas, gradient alignment, label store, method step,
and the bad inputs refused before anything starts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayssl.config import ModelSection
from rayssl.methods.cdul import CDUL, CDULConfig, gradient_alignment_update
from rayssl.pseudolabel.labels import aggregate_snippets, initial_labels, similarity_vector, snippet_tiles
from rayssl.pseudolabel.store import LabelStore, to_latent


def test_similarity_vector_is_softmax_of_scaled_cosine():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(3, 8, generator=g) * 5, torch.randn(4, 8, generator=g)
    scale = 100.0
    got = similarity_vector(img, txt, scale)
    for i in range(3):
        cos = [float(img[i] @ txt[c] / (img[i].norm() * txt[c].norm())) for c in range(4)]
        e = [math.exp(scale * x) for x in cos]
        assert got[i].tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-4, abs=1e-6)
    # Dividing by the stored log-scale (the reproduction bug) gives a much flatter vector.
    flat = similarity_vector(img, txt, 1.0 / math.log(scale))
    assert float(got.max(1).values.mean()) > float(flat.max(1).values.mean()) + 0.2


def test_snippet_tiles_row_major():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    t = snippet_tiles(x, 3)
    assert t.shape == (2, 9, 3, 2, 2)
    for r in range(3):
        for c in range(3):
            assert torch.equal(t[:, r * 3 + c], x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2])
    with pytest.raises(ValueError, match="3x3 grid"):
        snippet_tiles(torch.zeros(1, 3, 7, 7), 3)


def test_aggregation_and_initial_label_against_loops():
    g = torch.Generator().manual_seed(1)
    snip = torch.rand(4, 9, 5, generator=g)
    glob = torch.rand(4, 5, generator=g)
    for gamma in (0.0, 0.5, 0.9, 2.0):
        agg = aggregate_snippets(snip, gamma)
        for b in range(4):
            for c in range(5):
                col = [float(snip[b, s, c]) for s in range(9)]
                want = max(col) if max(col) >= gamma else min(col)
                assert float(agg[b, c]) == pytest.approx(want)
    agg = aggregate_snippets(snip, 0.0)
    assert torch.equal(agg, snip.max(1).values)  # gamma = 0 is max-pooling
    for lam in (0.0, 0.25):
        lab = initial_labels(glob, agg, lam)
        for b in range(4):
            for c in range(5):
                a, s = float(glob[b, c]), float(agg[b, c])
                assert float(lab[b, c]) == pytest.approx(min(1.0, (a + s) / 2 + lam * abs(a - s)))
    assert torch.allclose(initial_labels(glob, agg, 0.5), torch.maximum(glob, agg))


def test_gradient_alignment_matches_hand_computation():
    latent = torch.tensor([[0.0, 2.0, -1.0]])
    logits = torch.tensor([[1.5, -0.5, 3.0]])
    lr, sigma = 0.7, 0.3
    got = gradient_alignment_update(latent, logits, lr, sigma)
    for c in range(3):
        u, z = float(latent[0, c]), float(logits[0, c])
        y = 1 / (1 + math.exp(-u))
        # d/dy of -[y log p + (1 - y) log(1 - p)] with p = sigmoid(z) is log((1 - p)/p) = -z
        p = 1 / (1 + math.exp(-z))
        grad = -math.log(p) + math.log(1 - p)
        w = math.exp(-((y - 0.5) ** 2) / (2 * sigma**2))
        assert float(got[0, c]) == pytest.approx(u - lr * w * grad, rel=1e-5)
    # A label at 0.5 moves the most; it moves towards the classifier's prediction.
    assert float(got[0, 0]) > 0 and float(got[0, 2]) > -1.0


@pytest.mark.parametrize("directory", [False, True])
def test_label_store_update_state_and_errors(tmp_path, directory):
    store = LabelStore(10, 3, directory=str(tmp_path) if directory else None)
    soft = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.0]])
    store.set_soft(torch.tensor([7, 2]), soft)
    assert torch.allclose(store.get_soft(torch.tensor([2, 7])), soft.flip(0).clamp(1e-4, 1 - 1e-4), atol=1e-6)
    with pytest.raises(KeyError, match="no pseudo-label"):
        store.get_soft(torch.tensor([3]))
    with pytest.raises(IndexError):
        store.get_soft(torch.tensor([10]))
    store.set_latent(torch.tensor([2]), torch.tensor([[1.0, 2.0, 3.0]]))
    state = store.state_dict()
    other = LabelStore(10, 3)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.latent, store.latent) and torch.equal(other.known, store.known)
    with pytest.raises(ValueError, match="expected"):
        LabelStore(11, 3).load_state_dict(state)
    if directory:
        assert not list(tmp_path.iterdir())  # the mapped file leaves nothing behind


def _method(store, **cfg):
    torch.manual_seed(0)
    m = CDUL(CDULConfig(pseudo_labels="x", **cfg), ModelSection(backbone="resnet18", small_stem=False),
             num_crops=2, store=store, classes=["a", "b", "c"])
    assert m.head.out_features == 3
    # A tiny backbone keeps these unit tests fast; the ResNet path runs in the end-to-end test.
    m.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                     torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    m.head = torch.nn.Linear(8, 3)
    return m


def test_cdul_step_bce_and_label_update():
    store = LabelStore(6, 3)
    soft = torch.tensor([[0.9, 0.05, 0.5]] * 6)
    store.set_soft(torch.arange(6), soft)
    m = _method(store, label_warmup_epochs=1, label_lr=0.5, label_sigma=0.25)
    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    idx = torch.tensor([5, 0, 3, 1])
    loss, metrics = m(crops, epoch=0, index=idx)  # warm-up epoch: labels untouched
    z = m.logits(torch.cat(crops[:2]))
    want = torch.nn.functional.binary_cross_entropy_with_logits(z, store.get_soft(idx).repeat(2, 1))
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert store.updates == 0
    before = store.latent.clone()
    m(crops, epoch=1, index=idx)
    with torch.no_grad():
        z = m.logits(torch.cat(crops[:2])).reshape(2, 4, 3).mean(0)
    want = gradient_alignment_update(before[idx], z, 0.5, 0.25)
    assert torch.allclose(store.latent[idx], want, atol=1e-5)
    untouched = torch.tensor([2, 4])
    assert torch.equal(store.latent[untouched], before[untouched])
    m.cfg.gradient_alignment = False
    m(crops, epoch=3, index=idx)
    assert store.updates == 1



class _TorchRows:
    """A dataset shard's ``iter_torch_batches`` over fixed uint8 crops and an index column, without
    Ray; it records where each epoch's batches were asked to be placed."""

    def __init__(self, n: int, keys: list[str]):
        g = torch.Generator().manual_seed(0)
        self.rows = {k: torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g) for k in keys}
        self.rows["index"] = torch.arange(100, 100 + n)
        self.asked: list[tuple[str, bool]] = []

    def iter_torch_batches(self, *, batch_size, drop_last, device, pin_memory=False, local_shuffle_buffer_size=None,
                           local_shuffle_seed=None):
        self.asked.append((str(device), pin_memory))
        n = len(self.rows["index"])
        for a in range(0, n - batch_size + 1, batch_size):
            yield {k: v[a:a + batch_size].to(device) for k, v in self.rows.items()}


def test_the_feed_leaves_the_index_on_the_host_and_moves_the_crops():
    """On an accelerator ("meta" stands in for one here) CDUL's index column stays on the host,
    where the label store is (a copy back at every step would wait for the device), while the
    crops go to the device; a method without columns has Ray Data place the whole batch."""
    from rayssl.config import Config
    from rayssl.data.feed import TrainFeed
    from rayssl.data.tensors import to_float_images

    cfg = Config.from_dict({"data": {"crop_sizes": [16], "crop_counts": [2], "min_scale": [0.14], "max_scale": [1.0],
                                     "shuffle_buffer": 0}})
    keys = ["crop_0", "crop_1"]
    meta = torch.device("meta")
    src = _TorchRows(8, keys)
    batches = list(TrainFeed(src, cfg.data, meta, batch_size=4, seed=5, columns=CDUL.batch_columns).epoch(0))
    assert src.asked == [("cpu", False)]  # pinned only for a CUDA device
    assert len(batches) == 2
    for b, (crops, cols) in enumerate(batches):
        assert [c.device.type for c in crops] == ["meta", "meta"] and crops[0].shape == (4, 3, 16, 16)
        assert cols["index"].device.type == "cpu" and cols["index"].tolist() == list(range(100 + 4 * b, 104 + 4 * b))
    # On the CPU the crops are the same numbers whichever way they came.
    cpu = [crops for crops, _ in TrainFeed(src, cfg.data, torch.device("cpu"), batch_size=4, seed=5,
                                           columns=CDUL.batch_columns).epoch(0)]
    assert torch.equal(cpu[1][0], to_float_images(src.rows["crop_0"][4:8], channels_last=False))
    plain = _TorchRows(8, keys)
    assert all(c.device.type == "meta" for crops, _ in TrainFeed(plain, cfg.data, meta, batch_size=4, seed=5)
               .epoch(0) for c in crops)
    assert plain.asked == [("meta", False)]

def test_bce_learns_soft_labels_on_a_fixed_batch():
    store = LabelStore(8, 3)
    soft = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.9]] * 4)
    store.set_soft(torch.arange(8), soft)
    m = _method(store, gradient_alignment=False)
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(8, 3, 32, 32, generator=g) + soft[:, :1, None, None] * 2] * 2
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss, _ = m(crops, index=torch.arange(8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1


def test_to_latent_is_the_logit():
    y = torch.tensor([0.2, 0.5, 0.99])
    assert torch.allclose(torch.sigmoid(to_latent(y)), y, atol=1e-6)
    assert torch.isfinite(to_latent(torch.tensor([0.0, 1.0]))).all()


# ------------------------------------------------------------------------- bad input


def test_class_list_errors(tmp_path):
    from rayssl.cli.label import parse_classes

    with pytest.raises(ValueError, match="--classes: class file not found: .*nope.txt"):
        parse_classes(str(tmp_path / "nope.txt"), "scenes")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# comment\n")
    with pytest.raises(ValueError, match="--classes: class file .* holds no class names"):
        parse_classes(str(empty), "scenes")
    with pytest.raises(ValueError, match="--classes: the list holds no class names"):
        parse_classes(" , ,", "scenes")
    with pytest.raises(ValueError, match="duplicate class names .*cat"):
        parse_classes("cat,dog,cat", "x")
    with pytest.raises(ValueError, match="--classes: required"):
        parse_classes(None, "/some/folder")
    js = tmp_path / "c.json"
    js.write_text('["a", "b"]')
    assert parse_classes(str(js), "x") == ["a", "b"]
    assert parse_classes("cat, dog", "x") == ["cat", "dog"]
    assert parse_classes(None, "scenes")[0] == "circle"


def test_clip_argument_errors(tmp_path):
    from rayssl.pseudolabel.clip import ClipLoadError, check_clip_args

    with pytest.raises(ClipLoadError, match="--clip-model: open_clip does not know the model 'ViT-Nope-99'"):
        check_clip_args("ViT-Nope-99", "openai")
    with pytest.raises(ClipLoadError, match="--clip-pretrained: checkpoint file not found: .*missing.pt"):
        check_clip_args("rayssl-tiny-clip", str(tmp_path / "missing.pt"))
    with pytest.raises(ClipLoadError, match="neither a file nor a hub tag of ViT-B-32"):
        check_clip_args("ViT-B-32", "no-such-tag")
    check_clip_args("ViT-B-32", "openai")  # a known hub tag passes the offline check


def test_cli_refuses_cdul_without_pseudo_labels(capsys):
    from rayssl.cli.train import main

    assert main(["--method", "cdul", "--print-config"]) == 2
    assert "--pseudo-labels (cdul.pseudo_labels): required" in capsys.readouterr().err
    assert main(["--method", "swav", "--pseudo-labels", "x", "--print-config"]) == 2
    assert "--pseudo-labels: only used by --method cdul" in capsys.readouterr().err


@pytest.mark.parametrize("preset_args", [[], ["--preset", "paper", "--data", "/data/images"]])
def test_cdul_presets_keep_only_the_first_crop_group(preset_args):
    """CDUL classifies the large views only: its presets keep the first crop group of the
    preset's shared data section, instead of augmenting small crops nobody reads."""
    import dataclasses

    from rayssl.config import DataSection
    from rayssl.presets import PRESETS
    from rayssl.cli.train import build_parser, resolve_config

    cdul = resolve_config(build_parser().parse_args(["--method", "cdul", "--pseudo-labels", "s3://b/l",
                                                     *preset_args])).data
    shared = {**dataclasses.asdict(DataSection()), **PRESETS["paper" if preset_args else "quick"].get("data", {})}
    assert len(shared["crop_sizes"]) == 2  # the preset itself has small crops
    for key in ("crop_sizes", "crop_counts", "min_scale", "max_scale"):
        assert list(getattr(cdul, key)) == list(shared[key][:1]), key


def test_cdul_refuses_crop_groups_it_would_not_use(capsys):
    from rayssl.cli.train import main

    assert main(["--method", "cdul", "--pseudo-labels", "s3://b/l", "--print-config",
                 "--set", "data.crop_sizes=[64,32]", "--set", "data.crop_counts=[2,4]",
                 "--set", "data.min_scale=[0.5,0.2]", "--set", "data.max_scale=[1.0,0.5]"]) == 2
    err = capsys.readouterr().err
    assert "data.crop_sizes: cdul classifies the views of the first crop group only" in err
    assert "the other 1 group(s) [32]" in err


def test_relative_pseudo_labels_path_is_made_absolute(tmp_path, monkeypatch):
    """Ray's training workers do not run in the shell's directory: a relative path must be
    resolved on the driver, or the workers look for the labels somewhere else."""
    import argparse

    from rayssl.cli.train import build_parser, prepare_output, resolve_config

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["--method", "cdul", "--pseudo-labels", "runs/labels",
                                      "--set", "cdul.store_dir=store"])
    assert isinstance(args, argparse.Namespace)
    cfg = resolve_config(args)
    assert cfg.method.pseudo_labels == str(tmp_path / "runs" / "labels")
    assert cfg.method.store_dir == str(tmp_path / "store")
    args = build_parser().parse_args(["--method", "cdul", "--pseudo-labels", "s3://bucket/labels"])
    assert resolve_config(args).method.pseudo_labels == "s3://bucket/labels"  # URIs untouched
    # --resume starts from the stored config, and the flags given again go over it: the same rule.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml())
    monkeypatch.chdir(tmp_path / "run")
    args = build_parser().parse_args(["--method", "cdul", "--pseudo-labels", "../runs/other", "--resume",
                                      "--output", str(tmp_path / "run")])
    resumed = prepare_output(resolve_config(args), args)
    assert resumed.run.resume and resumed.method.pseudo_labels == str(tmp_path / "runs" / "other")


def test_backbone_initialised_from_a_rayssl_checkpoint(tmp_path):
    from rayssl.checkpoint import write_rank_state, write_shared_state
    from rayssl.methods.cdul import load_backbone_from_checkpoint
    from rayssl.modules.backbone import build_backbone

    torch.manual_seed(1)
    src, _ = build_backbone("resnet18")
    state = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    state["prototypes.weight"] = torch.zeros(3, 3)
    size = write_rank_state(tmp_path, 0, {"method": {}})
    write_shared_state(tmp_path, {"method": "swav", "model": state, "config": {}}, world_size=1, rank_sizes=[size])
    torch.manual_seed(2)
    dst, _ = build_backbone("resnet18")
    load_backbone_from_checkpoint(dst, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    other, _ = build_backbone("resnet18", small_stem=True)  # 3x3 stem: conv1 shapes differ
    with pytest.raises(ValueError, match="cdul.init_checkpoint: .* does not match model.backbone"):
        load_backbone_from_checkpoint(other, str(tmp_path))
    with pytest.raises(ValueError, match="cdul.init_checkpoint: .*nope does not exist"):
        load_backbone_from_checkpoint(other, str(tmp_path / "nope"))


def test_scene_ground_truth_follows_the_users_class_list():
    """The labelling job's ``gt`` columns are the user's classes in the user's order; a class that
    is not a scene shape leaves no ground truth rather than a misaligned one."""
    from rayssl.data.scenes import SHAPES, generate_batch
    from rayssl.pseudolabel.job import load_scenes

    ids = np.arange(6)
    truth = generate_batch(ids, seed=3, size=32)["labels"]
    out = load_scenes({"id": ids}, seed=3, size=32, side=32, classes=["star", "circle", "ring"])
    want = truth[:, [SHAPES.index("star"), SHAPES.index("circle"), SHAPES.index("ring")]]
    np.testing.assert_array_equal(out["gt"], want)
    np.testing.assert_array_equal(load_scenes({"id": ids}, seed=3, size=32, side=32)["gt"], truth)
    assert "gt" not in load_scenes({"id": ids}, seed=3, size=32, side=32, classes=["star", "zebra"])


def test_labelling_listing_of_compressed_tars_says_why_it_is_empty(tmp_path):
    """A gzip-compressed tar has no byte range per member: the listing finds nothing and says
    what the job needs, instead of labelling zero images."""
    import gzip

    from conftest import make_tar
    from rayssl.data.sources import DataError, resolve_source
    from rayssl.pseudolabel.job import listing_table

    tar = make_tar([("000.png", b"\x89PNG")])
    (tmp_path / "train-000000.tar").write_bytes(gzip.compress(tar))
    with pytest.raises(DataError, match="needs uncompressed tars"):
        listing_table(resolve_source(str(tmp_path)))
    (tmp_path / "train-000000.tar").write_bytes(tar)
    table = listing_table(resolve_source(str(tmp_path)))
    assert table.to_pydict() == {"index": [0], "path": [str(tmp_path / "train-000000.tar")], "id": ["000"],
                                 "offset": [512], "length": [4]}
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"key": ["000"], "image": [b"\x89PNG"]}), tmp_path / "pq" / "train-000000.parquet")
    with pytest.raises(DataError, match="holds parquet shards"):
        listing_table(resolve_source(str(tmp_path / "pq")))
