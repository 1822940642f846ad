"""python -m rayssl.export: strict loads into torchvision and timm, detectron2's key layout, bad input."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
import torchvision

from checkpoints import write_random_checkpoint
from rayssl.cli import export
from rayssl.export.formats import torchvision_model
from rayssl.export import detectron2_key


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-ckpts")
    models = {
        "mls": write_random_checkpoint(root / "mls", "mls", queue_size=64, projection_hidden_dim=32,
                                       projection_dim=16, k=4),
        "small": write_random_checkpoint(root / "small", "swav", small_stem=True, num_prototypes=8,
                                         projection_hidden_dim=32, projection_dim=16),
    }
    return root, models


def _run(argv, capsys):
    rc = export.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _export(ckpt, fmt: str, out, capsys) -> str:
    """Run a successful export; returns its stderr (the loading notes)."""
    rc, _, err = _run(["--checkpoint", ckpt, "--format", fmt, "--out", out], capsys)
    assert rc == 0, err
    return err


def _outputs(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


def test_torchvision_export_loads_strictly_and_is_the_online_encoder(ckpts, tmp_path, capsys):
    root, models = ckpts
    out = tmp_path / "r18.pth"
    rc, stdout, err = _run(["--checkpoint", root / "mls", "--format", "torchvision", "--out", out], capsys)
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["arch"] == "resnet18"
    sd = torch.load(out, weights_only=True)  # plain tensors only
    net = torchvision.models.resnet18(weights=None)
    missing = net.load_state_dict(sd, strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys
    net.fc = torch.nn.Identity()
    net.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    mls = models["mls"]
    assert torch.allclose(_outputs(net, x), _outputs(mls.backbone, x), atol=1e-5)
    # MoCo's convention: the query (online) encoder, not the momentum copy.
    assert not torch.allclose(_outputs(net, x), _outputs(mls.momentum_backbone, x), atol=1e-3)


def test_timm_export_loads_strictly_into_timm_and_computes_the_same_features(ckpts, tmp_path, capsys):
    timm = pytest.importorskip("timm")  # installed with open_clip; the layout test below needs no timm
    root, models = ckpts
    out = tmp_path / "r18-timm.pth"
    _export(root / "mls", "timm", out, capsys)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(_outputs(net, x), _outputs(models["mls"].backbone, x), atol=1e-5)


def _documented_detectron2_keys(blocks: list[int], bottleneck: bool) -> set[str]:
    """detectron2's ResNet names (BasicStem + BasicBlock/BottleneckBlock), written out by hand."""
    norm = ("weight", "bias", "running_mean", "running_var")
    keys = {"stem.conv1.weight", *(f"stem.conv1.norm.{n}" for n in norm)}
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for stage, count in zip(range(2, 6), blocks):
        for b in range(count):
            for c in convs:
                keys.add(f"res{stage}.{b}.conv{c}.weight")
                keys.update(f"res{stage}.{b}.conv{c}.norm.{n}" for n in norm)
            if b == 0 and (bottleneck or stage > 2):  # channel or stride change: projection shortcut
                keys.add(f"res{stage}.0.shortcut.weight")
                keys.update(f"res{stage}.0.shortcut.norm.{n}" for n in norm)
    return keys


def test_detectron2_export_has_the_documented_layout_and_values(ckpts, tmp_path, capsys):
    root, models = ckpts
    out = tmp_path / "r18.pkl"
    err = _export(root / "mls", "detectron2", out, capsys)
    assert "STRIDE_IN_1X1 False" in err and "RES2_OUT_CHANNELS 64" in err
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["matching_heuristics"] is True and obj["__author__"].startswith("rayssl")
    model = obj["model"]
    assert set(model) == _documented_detectron2_keys([2, 2, 2, 2], bottleneck=False)
    tv = models["mls"].backbone.state_dict()
    for d2, src in [("stem.conv1.weight", "conv1.weight"), ("stem.conv1.norm.running_var", "bn1.running_var"),
                    ("res3.0.shortcut.weight", "layer2.0.downsample.0.weight"),
                    ("res5.0.shortcut.norm.running_mean", "layer4.0.downsample.1.running_mean"),
                    ("res4.1.conv2.norm.bias", "layer3.1.bn2.bias")]:
        assert model[d2].shape == tuple(tv[src].shape)
        assert (model[d2] == tv[src].numpy()).all(), d2


def test_detectron2_names_for_resnet50_bottlenecks():
    names = {detectron2_key(k) for k in torchvision.models.resnet50(weights=None).state_dict()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert names == _documented_detectron2_keys([3, 4, 6, 3], bottleneck=True)


def test_small_stem_exports_to_torchvision_with_instructions_and_is_refused_elsewhere(ckpts, tmp_path, capsys):
    root, models = ckpts
    out = tmp_path / "small.pth"
    err = _export(root / "small", "torchvision", out, capsys)
    assert "small-image stem" in err and "m.maxpool = torch.nn.Identity()" in err
    net = torchvision_model("resnet18", small_stem=True)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_outputs(net, x), _outputs(models["small"].backbone, x), atol=1e-5)
    for fmt in ("timm", "detectron2"):
        target = tmp_path / f"small.{fmt}"
        rc, _, err = _run(["--checkpoint", root / "small", "--format", fmt, "--out", target], capsys)
        assert rc == 2 and "small-image stem" in err and len(err.strip().splitlines()) == 1
        assert not target.exists()


def test_bad_input_one_line_and_nothing_written(ckpts, tmp_path, capsys):
    root, _ = ckpts
    not_ours = tmp_path / "downloaded"
    not_ours.mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), not_ours / "model.pt")
    plain_file = not_ours / "model.pt"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    existing = tmp_path / "existing.pth"
    existing.write_bytes(b"keep me")
    cases = [
        (["--checkpoint", not_ours, "--format", "torchvision", "--out", tmp_path / "o1.pth"],
         "not a complete rayssl checkpoint"),
        (["--checkpoint", plain_file, "--format", "torchvision", "--out", tmp_path / "o2.pth"],
         "is a file, not a rayssl checkpoint directory"),
        (["--checkpoint", tmp_path / "nope", "--format", "timm", "--out", tmp_path / "o3.pth"], "does not exist"),
        (["--checkpoint", root / "mls", "--format", "torchvision", "--arch", "resnet50", "--out",
          tmp_path / "o4.pth"], "--arch resnet50: the checkpoint's backbone is resnet18"),
        (["--checkpoint", root / "mls", "--format", "detectron2", "--out", blocker / "o5.pkl"],
         "is not a directory"),
        (["--checkpoint", root / "mls", "--format", "torchvision", "--out", existing], "already exists"),
    ]
    before = sorted(os.listdir(tmp_path))
    for argv, expected in cases:
        rc, stdout, err = _run(argv, capsys)
        assert rc == 2 and expected in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and stdout == ""
    assert sorted(os.listdir(tmp_path)) == before  # nothing half-written, no temp files
    assert existing.read_bytes() == b"keep me"


def test_a_failed_write_leaves_nothing(ckpts, tmp_path, capsys, monkeypatch):
    root, _ = ckpts

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    rc, _, err = _run(["--checkpoint", root / "mls", "--format", "torchvision", "--out", tmp_path / "x.pth"], capsys)
    assert rc == 2 and "write failed (No space left on device)" in err
    assert os.listdir(tmp_path) == []


def test_checkpoint_and_out_on_s3(ckpts, s3_endpoint, capsys):
    import s3fs

    root, models = ckpts
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("rayssl-export")
    fs.put(str(root / "small"), "rayssl-export/run/checkpoint_000001", recursive=True)
    out = "s3://rayssl-export/exports/small.pth"
    rc, _, err = _run(["--checkpoint", "s3://rayssl-export/run", "--format", "torchvision", "--out", out,
                       "--s3-endpoint", s3_endpoint], capsys)  # a run directory: its newest checkpoint
    assert rc == 0, err
    net = torchvision_model("resnet18", small_stem=True)
    net.load_state_dict(torch.load(io.BytesIO(fs.cat_file(out[5:])), weights_only=True), strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(_outputs(net, x), _outputs(models["small"].backbone, x), atol=1e-5)
    rc, _, err = _run(["--checkpoint", "s3://rayssl-export/nothing-here", "--format", "torchvision",
                       "--out", "s3://rayssl-export/exports/x.pth", "--s3-endpoint", s3_endpoint], capsys)
    assert rc == 2 and "does not exist" in err and not fs.exists("rayssl-export/exports/x.pth")
