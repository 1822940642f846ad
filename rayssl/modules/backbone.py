"""torchvision ResNet backbones, optionally with a small-image stem.

The table ``BACKBONES`` is plain data so that config validation does not import torch.
"""

from __future__ import annotations

# name -> feature dimension of the pooled output
BACKBONES: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def build_backbone(name: str, small_stem: bool = False):
    """Return ``(module, feat_dim)``: a torchvision ResNet whose ``fc`` is ``Identity``.

    Input (B, 3, H, W) float -> output (B, feat_dim). ``small_stem`` replaces the 7x7/2 conv
    and the max-pool by a 3x3/1 conv (CIFAR-style), so 32-96 px inputs keep spatial detail
    through the network; keys stay those of torchvision, so exports still load into it.
    """
    import torch.nn as nn
    import torchvision

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, BACKBONES[name]
