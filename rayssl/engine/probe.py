"""The online linear probe (``eval.online_probe``): a linear head trained beside pretraining.

solo-learn's habit, for data without labels: after each training step, rank 0 takes one small
batch of the labelled split (the user's ``eval.data``, or labelled scenes when training on the
scenes), computes the backbone's features, and takes one optimiser step of a linear head on
them; at the end of every epoch the head's top-1 (one class per image) or macro mAP (several)
on the held-out labelled images is reported (``probe_top1`` / ``probe_map``). It follows the
backbone as it changes, which a kNN run at the epoch's end does not.

It never touches what training does: the features are computed without gradients and in eval
mode (no batch-norm statistic moves; the mode is restored), the head has its own optimiser, and
the probe draws from its own generator, so the training RNG streams and the backbone's update
are bit-identical with the probe on and off. The head restarts from scratch after a resume.
Pure PyTorch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rayssl.eval.features import extract_features
from rayssl.eval.metrics import mean_average_precision
from rayssl.modules.seeding import cpu_seeded

__all__ = ["LabelledImages", "OnlineProbe"]


class LabelledImages:
    """uint8 images (N, H, W, 3) with their targets: class indices (N,) or multi-hot (N, C)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, num_classes: int):
        if len(images) != len(targets) or len(images) < 1:
            raise ValueError(f"labelled images: {len(images)} images for {len(targets)} targets")
        self.images, self.targets, self.num_classes = images, np.asarray(targets), num_classes
        self.multilabel = self.targets.ndim == 2


class OnlineProbe:
    """See the module docstring. ``backbone``: the module trained (its features are read, never
    its gradients); ``size``: the side the images are resized to (the large crop's)."""

    def __init__(self, backbone: torch.nn.Module, train: LabelledImages, test: LabelledImages, size: int,
                 device, *, batch_size: int, lr: float, seed: int):
        self.backbone, self.train, self.test = backbone, train, test
        self.size, self.device, self.batch_size = size, torch.device(device), batch_size
        self.gen = torch.Generator().manual_seed(seed)
        dim = self._features(train.images[:1]).shape[1]
        with cpu_seeded(seed):  # the head's init leaves the training's random streams alone
            self.head = torch.nn.Linear(dim, train.num_classes).to(self.device)
        self.opt = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.metric = "probe_map" if train.multilabel else "probe_top1"

    def _features(self, images: np.ndarray) -> torch.Tensor:
        return extract_features(self.backbone, images, self.size, self.device, on_device=True)

    def _loss(self, logits: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
        y = torch.as_tensor(targets, device=self.device)
        if self.train.multilabel:
            return F.binary_cross_entropy_with_logits(logits, y.float())
        return F.cross_entropy(logits, y.long())

    def step(self) -> None:
        """One optimiser step of the head on a batch drawn from the labelled training split."""
        rows = torch.randint(len(self.train.targets), (self.batch_size,), generator=self.gen).numpy()
        feats = self._features(self.train.images[rows])
        loss = self._loss(self.head(feats), self.train.targets[rows])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def score(self) -> dict:
        """``{metric: value}`` of the head on the held-out labelled images."""
        logits = self.head(self._features(self.test.images)).float().cpu()
        if self.train.multilabel:
            return {self.metric: mean_average_precision(logits, torch.as_tensor(self.test.targets).float())}
        correct = logits.argmax(1) == torch.as_tensor(self.test.targets).long()
        return {self.metric: float(correct.float().mean())}
