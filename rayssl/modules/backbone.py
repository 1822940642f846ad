"""Backbones: torchvision ResNets (optionally with a small-image stem) and any timm model.

``model.backbone`` is ``resnet18`` / ``resnet34`` / ``resnet50`` (torchvision, ``fc`` replaced by
``Identity``) or ``timm:<name>`` for any model timm builds with ``num_classes=0`` (its pooled
features): ``timm:resnet50``, ``timm:convnext_tiny``, ``timm:vit_small_patch16_224``... Vision
Transformers are built with timm's dynamic image size, which interpolates the position
embedding per input, so multi-crop's different crop sizes (2 x 224 + 6 x 96) go through one
network unchanged. The table ``BACKBONES`` is plain data so that config validation of the
torchvision names does not import torch; timm is imported only for ``timm:`` names.
"""

from __future__ import annotations

# name -> feature dimension of the pooled output
BACKBONES: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
TIMM_PREFIX = "timm:"

__all__ = ["BACKBONES", "TIMM_PREFIX", "backbone_problem", "build_backbone", "is_timm", "sync_batchnorm", "timm_name"]


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def timm_name(name: str) -> str:
    """``timm:vit_small_patch16_224`` -> ``vit_small_patch16_224``."""
    return name[len(TIMM_PREFIX):]


def backbone_problem(name: str, small_stem: bool = False) -> str | None:
    """Why ``name`` (with ``small_stem``) is no backbone rayssl can build, or None."""
    if name in BACKBONES:
        return None
    if not is_timm(name):
        return f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or timm:<model name>"
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        return "timm is not installed (pip install timm)"
    if not timm.is_model(timm_name(name)):
        return (f"timm has no model {timm_name(name)!r} (python -c \"import timm; "
                f"print(timm.list_models('*{timm_name(name).split('_')[0]}*'))\" lists its models)")
    if small_stem:
        return ("model.small_stem replaces a torchvision ResNet's stem; a timm model keeps its own "
                "(set model.small_stem=false: SwAV's quick preset on the built-in scenes turns it on)")
    return None


def build_backbone(name: str, small_stem: bool = False):
    """Return ``(module, feat_dim)``: the backbone without a classifier, randomly initialised.

    Input (B, 3, H, W) float -> output (B, feat_dim). ``small_stem`` (torchvision ResNets) replaces
    the 7x7/2 conv and the max-pool by a 3x3/1 conv (CIFAR-style), so 32-96 px inputs keep spatial
    detail through the network; keys stay those of torchvision, so exports still load into it.
    """
    import torch.nn as nn

    problem = backbone_problem(name, small_stem)
    if problem:
        raise ValueError(problem)
    if is_timm(name):
        import timm

        try:  # ViTs: position embeddings interpolated per input size (multi-crop)
            net = timm.create_model(timm_name(name), pretrained=False, num_classes=0, dynamic_img_size=True)
        except TypeError:  # a model without that option (CNNs take any size)
            net = timm.create_model(timm_name(name), pretrained=False, num_classes=0)
        return net, int(net.num_features)
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, BACKBONES[name]


def sync_batchnorm(module):
    """``module`` with every BatchNorm layer made a SyncBatchNorm (statistics over all ranks).

    timm's converter (timm is a dependency, imported here only): many timm models fuse the
    activation into the norm layer (``BatchNormAct2d``: EfficientNet, MobileNetV3, RegNet...),
    and torch's own converter turns those into a plain SyncBatchNorm that never calls the
    activation, a network without its non-linearities that trains without an error. timm's
    converts them to their synchronised form and hands every other layer to torch's.
    """
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(module)
