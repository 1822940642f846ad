"""The backbones and starting points users bring: timm models (ViTs on multi-crop included),
pretrained weights from files, runs and caches, fp16 with a gradient scaler, gradient clipping."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch

from conftest import tiny_args
from rayssl.checkpoint import load_checkpoint
from rayssl.cli import train
from rayssl.config import ConfigError, deep_merge
from rayssl.engine import Engine, resolve_precision, set_cudnn_benchmark, training_precision
from rayssl.data.tensors import to_float_images
from rayssl.eval.features import extract_features
from rayssl.export.formats import export_backbone
from rayssl.modules.backbone import build_backbone, timm_name
from rayssl.modules.precision import bf16_unsafe_convs, cpu_has_bf16_matmul
from rayssl.modules.pretrained import load_into, read_weights
from rayssl.presets import layered_config

BACKBONES = ["resnet18", "timm:resnet18", "timm:convnext_atto", "timm:vit_tiny_patch16_224"]
HEADS = {"swav": {"num_prototypes": 16, "projection_hidden_dim": 32, "projection_dim": 16},
         "moco": {"queue_size": 32, "projection_hidden_dim": 32, "projection_dim": 16}}


def _config(method: str, backbone: str, **extra):
    # 32 and 16 px would leave a ConvNeXt's last stage with less than its 2x2 kernel: 64 and 32.
    crops = {"crop_sizes": [64, 32], "crop_counts": [2, 2], "min_scale": [0.5, 0.2], "max_scale": [1.0, 0.5]} \
        if method == "swav" else {"crop_sizes": [64]}
    overrides = {"run": {"method": method, "batch_size": 8, "num_workers": 1, "epochs": 1},
                 "data": {"scenes_image_size": 64, **crops}, "model": {"backbone": backbone, "small_stem": False},
                 method: HEADS[method]}
    return layered_config(deep_merge(overrides, extra))


def _crops(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, s, s, generator=g) for s, c in zip(cfg.data.crop_sizes, cfg.data.crop_counts)
            for _ in range(c)]


def _features(net, seed: int = 1, size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", ["swav", "moco"])
def test_backbone_trains_and_exports_to_a_strict_load_with_the_same_features(method, backbone, tmp_path):
    cfg = _config(method, backbone)
    engine = Engine(cfg, steps_per_epoch=4)
    engine.start()
    for i in range(2):  # every crop size through the one network (a ViT interpolates its positions)
        assert math.isfinite(float(engine.train_step(_crops(cfg, i))["loss"]))
    engine.write_checkpoint(str(tmp_path))
    ckpt = load_checkpoint(str(tmp_path))
    fmt = "timm" if backbone.startswith("timm:") else "torchvision"
    data, notes = export_backbone(ckpt, fmt)
    if fmt == "timm":
        import timm

        target = timm.create_model(timm_name(backbone), num_classes=0)
    else:
        import torchvision

        target = torchvision.models.resnet18()
        target.fc = torch.nn.Identity()
    target.load_state_dict(torch.load(io.BytesIO(data)), strict=True)
    size = 224 if "vit" in backbone else 64  # the stock ViT takes its default size; ours any
    assert torch.allclose(_features(target, size=size), _features(engine.method.backbone, size=size), atol=1e-5)
    if fmt == "timm":
        with pytest.raises(ValueError, match="export it with --format timm"):
            export_backbone(ckpt, "torchvision")


def test_a_timm_vit_continues_from_its_weights_on_two_ray_train_workers(ray_session, tmp_path, capsys):
    import json

    import timm

    weights = tmp_path / "vit_tiny.pth"  # a timm state dict, classifier included, as a hub file holds it
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), weights)
    assert train.main(tiny_args(tmp_path / "vit", "--epochs", "1", "--set", "model.backbone=timm:vit_tiny_patch16_224",
                                "--set", f"model.pretrained={weights}", "--set", "model.small_stem=false",
                                "--set", "data.scenes_image_size=32", "--set", "data.crop_sizes=[32,16]",
                                "--set", "eval.knn_k=5", "--set", "eval.random_baseline=true")) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"]) and summary["pretrained"] == str(weights)
    # scored against both starting points: a random ViT and the weights it continued from
    assert 0 <= summary["knn_top1_pretrained"] <= 1 and 0 <= summary["knn_top1_random_init"] <= 1
    assert "dropped its classifier (head.weight, head.bias)" in out.err


# --------------------------------------------------------------------------- starting weights


def _trained(method: str, backbone: str, root) -> Engine:
    engine = Engine(_config(method, backbone), steps_per_epoch=4)
    engine.start()
    engine.train_step(_crops(engine.cfg))
    root.mkdir(parents=True)
    engine.write_checkpoint(str(root))
    return engine


def test_pretrained_from_an_export_or_a_run_starts_from_those_weights(tmp_path):
    source = _trained("swav", "resnet18", tmp_path / "run")
    export = tmp_path / "r18.pth"
    export.write_bytes(export_backbone(load_checkpoint(str(tmp_path / "run")), "torchvision")[0])
    for pretrained in (str(export), str(tmp_path / "run")):
        for method in ("swav", "moco"):
            started = Engine(_config(method, "resnet18", model={"pretrained": pretrained}), steps_per_epoch=4)
            assert torch.equal(_features(started.method.backbone), _features(source.method.backbone))
            if method == "moco":  # the momentum encoder starts from the same weights
                assert torch.equal(_features(started.method.momentum_backbone), _features(source.method.backbone))
    # A full torchvision state dict (with its ImageNet classifier): the classifier is dropped, said so.
    import torchvision

    full = torchvision.models.resnet18()
    net, _ = build_backbone("resnet18")
    note = load_into(net, full.state_dict(), "resnet18", "imagenet.pth")
    assert note.startswith("dropped its classifier (fc.weight, fc.bias") and torch.equal(net.conv1.weight,
                                                                                         full.conv1.weight)


def test_weights_that_do_not_fit_are_refused_before_ray_with_the_key_lists(tmp_path, capsys):
    _trained("swav", "resnet18", tmp_path / "run")
    export = tmp_path / "r18.pth"
    export.write_bytes(export_backbone(load_checkpoint(str(tmp_path / "run")), "torchvision")[0])
    rc = train.main(["--output", str(tmp_path / "b"), "--set", "model.backbone=resnet34", "--set",
                     f"model.pretrained={export}"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.pretrained" in err and "does not match model.backbone=resnet34: missing" in err
    assert "layer1.2.conv1.weight" in err and not (tmp_path / "b").exists()  # refused before anything ran
    with pytest.raises(ConfigError, match="model.pretrained: .*nothing.pth does not exist"):
        read_weights(str(tmp_path / "nothing.pth"), "resnet18")
    (tmp_path / "text.pth").write_text("not torch")
    with pytest.raises(ConfigError, match="is not a torch state dict"):
        read_weights(str(tmp_path / "text.pth"), "resnet18")


def test_library_weights_come_only_from_the_local_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = os.path.join(str(tmp_path / "torch"), "hub", "checkpoints")
    with pytest.raises(ConfigError, match=rf"torchvision weights ResNet18_Weights.IMAGENET1K_V1 are not in the "
                                          rf"local cache {cache}") as refused:
        read_weights("torchvision", "resnet18")
    assert "(it is https://download.pytorch.org/models/resnet18-f37072fd.pth)" in str(refused.value)  # where to get it
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    os.makedirs(cache)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), os.path.join(cache, os.path.basename(weights.url)))
    state, origin = read_weights("torchvision:IMAGENET1K_V1", "resnet18")
    assert "ResNet18_Weights.IMAGENET1K_V1" in origin and torch.equal(state["conv1.weight"], reference.conv1.weight)
    with pytest.raises(ConfigError, match="has no torchvision weights 'NOPE'"):
        read_weights("torchvision:NOPE", "resnet18")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"timm weights of resnet18 \(timm/resnet18.a1_in1k\) are not in the local"):
        read_weights("timm", "timm:resnet18")
    with pytest.raises(ConfigError, match=r"Invalid pretrained tag \(nope\)"):
        read_weights("timm:nope", "timm:resnet18")
    # The layout huggingface_hub writes when it caches timm/resnet18.a1_in1k on a machine with network.
    import timm
    from safetensors.torch import save_file

    snapshot = tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("abc123")
    cached = timm.create_model("resnet18")  # with its classifier, as the hub holds it
    save_file(cached.state_dict(), str(snapshot / "model.safetensors"))
    state, origin = read_weights("timm", "timm:resnet18")
    assert "resnet18" in origin and "fc.weight" not in state and torch.equal(state["conv1.weight"],
                                                                               cached.conv1.weight)


# --------------------------------------------------------------------------- precision


def test_the_precision_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", cpu, bf16_supported=True) == "bf16"  # AMX
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_bf16_matmul() else "fp32")
    assert resolve_precision("auto", cuda, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", cuda, bf16_supported=False) == "fp16"  # V100, T4
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("setting", [True, False])
def test_cudnn_timing_follows_the_run_setting_on_cuda_and_nothing_else(setting, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not setting)  # restored after the test
    cfg = layered_config({"run": {"cudnn_benchmark": setting}})
    set_cudnn_benchmark(cfg, torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is (not setting)  # a CPU run leaves the switch alone
    set_cudnn_benchmark(cfg, torch.device("cuda"))  # the switch needs no GPU to be set
    assert torch.backends.cudnn.benchmark is setting
    assert layered_config({}).run.cudnn_benchmark is True


def test_bf16_is_not_chosen_where_its_cpu_convolution_gradients_go_wrong():
    # torch 2.14.1's oneDNN bf16 weight gradient of a strided 3x3 convolution of a 1 x 1 input came
    # out NaN in some steps (rayssl.modules.precision.bf16_unsafe_convs). 16 px crops through the
    # standard stem reach layer4 at 1 x 1; through the small-image stem, at 2 x 2.
    standard, _ = build_backbone("resnet18", small_stem=False)
    small, _ = build_backbone("resnet18", small_stem=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert bf16_unsafe_convs(standard, 16) == ["layer4.0.conv1"] and standard.training  # mode restored
    assert bf16_unsafe_convs(standard, 8) == ["layer3.0.conv1", "layer4.0.conv1"]
    assert bf16_unsafe_convs(standard, 32) == [] and bf16_unsafe_convs(small, 16) == []
    assert torch.equal(torch.get_rng_state(), state)  # the probe draws nothing
    tiny = _config("swav", "resnet18", data={"crop_sizes": [32, 16]})
    engine = Engine(tiny, steps_per_epoch=1)
    assert engine.precision == "fp32" and not engine.channels_last  # auto on a CPU, even with AMX
    assert training_precision(tiny, torch.device("cpu")) == "fp32"
    explicit = _config("swav", "resnet18", run={"precision": "bf16"}, data={"crop_sizes": [32, 16]})
    assert training_precision(explicit, torch.device("cpu")) == "bf16"  # the user's choice stands
    fine = _config("swav", "resnet18", data={"crop_sizes": [32, 16]}, model={"small_stem": True})
    engine = Engine(fine, steps_per_epoch=1)
    bf16 = cpu_has_bf16_matmul()
    assert engine.precision == ("bf16 autocast" if bf16 else "fp32") and engine.channels_last == bf16


def test_frozen_features_follow_the_precision_rule():
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18", small_stem=True)
    images = (np.random.default_rng(0).random((8, 32, 32, 3)) * 255).astype(np.uint8)
    layouts: list[bool] = []
    hook = net.register_forward_pre_hook(
        lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    exact = extract_features(net, images, 32, "cpu", precision="fp32")
    hook.remove()
    assert layouts == [True]  # channels_last images on a CPU too (oneDNN's faster layout)
    assert net.training  # the mode is restored
    net.eval()
    with torch.no_grad():
        reference = net(to_float_images(torch.from_numpy(images), channels_last=False))
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-5)  # fp32 in either layout: float rounding
    low = extract_features(net, images, 32, "cpu", precision="bf16")
    assert low.dtype == torch.float32 and not torch.equal(low, exact)  # computed in bf16, returned as float
    assert torch.nn.functional.cosine_similarity(low, exact).min() > 0.99
    assert torch.equal(extract_features(net, images, 32, "cpu"),  # auto: what this CPU resolves to
                       low if cpu_has_bf16_matmul() else exact)


def _grad_norm(engine) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in engine.method.parameters()
                                                 if p.grad is not None]))


def test_clipping_bounds_the_gradient_norm():
    engine = Engine(_config("moco", "resnet18", optim={"clip_grad_norm": 1e-3}), steps_per_epoch=4)
    engine.start()
    engine.train_step(_crops(engine.cfg))
    assert 0 < _grad_norm(engine) <= 1e-3 * 1.001


def test_fp16_steps_through_a_gradient_scaler_that_is_resumed(tmp_path):
    cfg = _config("swav", "resnet18", run={"precision": "fp16"}, optim={"clip_grad_norm": 1.0})
    engine = Engine(cfg, steps_per_epoch=4)
    engine.start()
    assert engine.scaler is not None and engine.precision == "fp16 autocast"
    before = [p.detach().clone() for p in engine.method.backbone.parameters()]
    scale = engine.scaler.get_scale()
    assert math.isfinite(float(engine.train_step(_crops(cfg))["loss"]))
    moved = any(not torch.equal(a, p) for a, p in zip(before, engine.method.backbone.parameters()))
    if torch.isfinite(_grad_norm(engine)):  # the step was taken on unscaled, clipped gradients
        assert moved and engine.scaler.get_scale() == scale and _grad_norm(engine) <= 1.0 * 1.001
    else:  # the scaled gradients overflowed: the scaler skipped the step and halved its scale
        assert not moved and engine.scaler.get_scale() == scale / 2
    engine.write_checkpoint(str(tmp_path))
    restored = Engine(cfg, steps_per_epoch=4)
    restored.restore(str(tmp_path))
    assert restored.scaler.get_scale() == engine.scaler.get_scale()
    assert Engine(_config("swav", "resnet18"), steps_per_epoch=4).scaler is None  # fp32 on CPU: no scaler


def test_pretrained_weights_come_from_s3_with_the_options_of_the_run(s3_endpoint, tmp_path):
    import s3fs

    from rayssl.storage import S3Options, StorageError

    net, _ = build_backbone("resnet18")
    local = tmp_path / "r18.pth"
    torch.save(net.state_dict(), local)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("weights")
    fs.put(str(local), "weights/r18.pth")
    state, origin = read_weights("s3://weights/r18.pth", "resnet18", S3Options(endpoint=s3_endpoint))
    assert origin == "file s3://weights/r18.pth" and torch.equal(state["conv1.weight"], net.conv1.weight)
    with pytest.raises(StorageError):  # an s3:// URI with no options: never a guessed endpoint
        read_weights("s3://weights/r18.pth", "resnet18")


@pytest.mark.parametrize("name", ["timm:mobilenetv3_small_050", "resnet18"])
def test_sync_batchnorm_keeps_every_layer_computing_what_it_did(name):
    """With several GPU workers every BatchNorm becomes a SyncBatchNorm, and in eval mode (running
    statistics, no collective) the network computes exactly what it did. timm's MobileNetV3 fuses
    the activation into its norm layers (BatchNormAct2d): torch's converter alone drops those
    activations, a different function (shown here, so the check can tell)."""
    import copy

    from rayssl.modules.backbone import sync_batchnorm

    torch.manual_seed(0)
    net, _ = build_backbone(name)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
        synced = sync_batchnorm(copy.deepcopy(net)).eval()
        assert torch.equal(synced(x), ref)
        norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
        if name.startswith("timm:"):
            plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).eval()
            assert not torch.allclose(plain(x), ref)
