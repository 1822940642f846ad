"""CDUL stage 2: a multi-label classifier trained on CLIP pseudo-labels, refined by
gradient alignment (Abdelfattah et al., ICCV 2023, arXiv:2307.16634, Sec. 3.2).

Pure PyTorch. The classifier (a torchvision ResNet + a linear layer, one logit per class)
learns from the soft labels with a per-class sigmoid + binary cross-entropy (the public
reproduction's softmax + KL treats the classes as exclusive, which its maintainer calls a
mistake). Every ``label_update_every`` epochs after ``label_warmup_epochs``, each image's
latent label u = logit(y) takes one step against the gradient of the loss with respect to
the label, weighted by a Gaussian of the label around 0.5:

    u <- u - label_lr * exp(-(y - 0.5)^2 / (2 sigma^2)) * dL/dy,    y_new = sigmoid(u)

with L the (summed) BCE of the classifier's logits z against y, so dL/dy = -z: confident
labels (near 0 or 1) barely move, uncertain ones follow the classifier. The new labels are
kept in the label store (``rayssl.pseudolabel.store``) for the following epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rayssl import dist
from rayssl.data.tensors import to_device_async
from rayssl.methods.base import Method, MethodConfig, register
from rayssl.modules.backbone import build_backbone
from rayssl.modules.pretrained import load_into, read_weights
from rayssl.sections import DataSection, ModelSection, RunSection, check
from rayssl.space import choice, loguniform
from rayssl.storage import S3Options

if TYPE_CHECKING:  # pragma: no cover
    from rayssl.pseudolabel.store import LabelStore

__all__ = ["CDUL", "CDULConfig", "gaussian_weight", "gradient_alignment_update", "load_backbone_from_checkpoint"]


@dataclass
class CDULConfig(MethodConfig):
    """CDUL stage-2 settings. The paper gives no numbers for the update step; these defaults
    are ours (a label at 0.5 moves by ``label_lr`` times the classifier's logit per update)."""

    section: ClassVar[str] = "cdul"
    path_keys: ClassVar[tuple[str, ...]] = ("pseudo_labels", "store_dir", "init_checkpoint")

    pseudo_labels: str = ""  # output folder/URI of `python -m rayssl.pseudolabel` (required)
    gradient_alignment: bool = True  # False: train on the initial labels only
    label_warmup_epochs: int = 1  # epochs on the initial labels before the first update
    label_update_every: int = 1  # epochs between label updates
    label_lr: float = 1.0  # step on the latent label
    label_sigma: float = 0.25  # width of the Gaussian weight around 0.5
    init_checkpoint: str = ""  # a rayssl SwAV/MLS/MoCo checkpoint dir whose backbone initialises this one
    store_dtype: str = "float32"  # float32 | float16 (label table precision)
    store_dir: str = ""  # "" = RAM; a local folder = memory-mapped label table there

    def __post_init__(self) -> None:
        s = self.section
        check(self.label_warmup_epochs >= 0, f"{s}.label_warmup_epochs", "must be >= 0")
        check(self.label_update_every >= 1, f"{s}.label_update_every", "must be >= 1")
        check(self.label_lr >= 0, f"{s}.label_lr", f"must be >= 0, got {self.label_lr}")
        check(self.label_sigma > 0, f"{s}.label_sigma", f"must be > 0, got {self.label_sigma}")
        check(self.store_dtype in ("float32", "float16"), f"{s}.store_dtype",
               f"must be float32 or float16, got {self.store_dtype!r}")

    def validate_with(self, run: RunSection, data: DataSection) -> None:
        check(bool(self.pseudo_labels), "cdul.pseudo_labels",
               "required for --method cdul: the output of `python -m rayssl.pseudolabel --out URI ...`")
        check(data.augment_on == "cpu", "data.augment_on",
               "cdul reads its rows (image index + crops) from the CPU pipeline; use data.augment_on=cpu")
        groups = len(data.crop_sizes)
        check(groups == 1, "data.crop_sizes",
               f"cdul classifies the views of the first crop group only; the other {groups - 1} group(s) "
               f"{data.crop_sizes[1:]} would be augmented and shipped for nothing: give one group "
               "(data.crop_sizes, crop_counts, min_scale and max_scale one entry each; the presets do)")

    def indexed_data(self) -> str:
        """Training reads the images the labelling job listed, each with its label-store index."""
        return self.pseudo_labels

    def update_epoch(self, epoch: int) -> bool:
        """Whether labels are updated during (0-based) ``epoch``."""
        e = epoch - self.label_warmup_epochs
        return self.gradient_alignment and e >= 0 and e % self.label_update_every == 0


def gaussian_weight(soft: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-((soft - 0.5) ** 2) / (2.0 * sigma * sigma))


def gradient_alignment_update(latent: torch.Tensor, logits: torch.Tensor, lr: float, sigma: float) -> torch.Tensor:
    """One gradient-alignment step on latent labels.

    Args:
        latent: (B, C) latent labels u (soft label y = sigmoid(u)).
        logits: (B, C) classifier logits z for the same images (no gradient flows to them).
        lr: step size on u; sigma: width of the Gaussian weight of y around 0.5.
    Returns:
        (B, C) new latent labels ``u - lr * w(y) * dL/dy`` with L = sum BCE(sigmoid(z), y).
    """
    y = torch.sigmoid(latent.detach().float()).requires_grad_(True)
    with torch.enable_grad():
        loss = F.binary_cross_entropy_with_logits(logits.detach().float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, y)
    return latent.detach().float() - lr * gaussian_weight(y.detach(), sigma) * grad


# The classifier trains on the views of the first crop group only: the presets keep that group
# (any further group would be decoded, augmented and shipped for nothing).
_QUICK = {"data": {"crop_sizes": [64], "crop_counts": [2], "min_scale": [0.5], "max_scale": [1.0]}}
_PAPER = {"data": {"crop_sizes": [224], "crop_counts": [2], "min_scale": [0.14], "max_scale": [1.0]}}


@register(
    "cdul", config=CDULConfig, metric="classifier_map",
    summary="CDUL: classifier on CLIP global-local pseudo-labels, refined by gradient alignment "
            "(Abdelfattah et al. 2023)",
    presets={"quick": _QUICK, "paper": _PAPER},
    # How often gradient alignment updates the labels, the sigma of its Gaussian weight around
    # 0.5, its step, and the lr. The labelling stage's grid, gamma and lambda are options of the
    # separate CLIP job (`python -m rayssl.pseudolabel --grid --gamma --lam`), whose output a
    # sweep takes as --set cdul.pseudo_labels=URI: compare label sets by running that job once
    # per setting.
    space={"cdul.label_update_every": choice(1, 2, 5), "cdul.label_sigma": loguniform(0.1, 1.0),
           "cdul.label_lr": loguniform(0.1, 10.0), "optim.base_lr": loguniform(0.001, 0.1)},
)
class CDUL(Method):
    """ResNet + linear multi-label head, trained on the label store's soft labels.

    ``forward(crops, epoch, step, index)``: crops of the first group (the views of each
    image) are each classified; loss = mean over views of the mean per-class BCE against
    the images' current soft labels. During update epochs the latent labels of the batch
    move by one gradient-alignment step computed from the view-averaged logits, and the
    updates of all workers are all-gathered and applied on every replica of the store.
    """

    batch_columns: ClassVar[tuple[str, ...]] = ("index",)  # extra batch columns the loop passes
    random_init_baseline: ClassVar[bool] = False  # the classifier scores itself, head included

    def __init__(self, cfg: CDULConfig, model: ModelSection, num_crops: int = 1, world_size: int | None = None,
                 options: S3Options | None = None, store: "LabelStore | None" = None,
                 classes: Sequence[str] | None = None):
        super().__init__()
        self.cfg = cfg
        if store is None:
            from rayssl.pseudolabel.store import store_from_pseudo_labels

            store, meta = store_from_pseudo_labels(
                cfg.pseudo_labels, dtype=getattr(torch, cfg.store_dtype), directory=cfg.store_dir or None,
                options=options)
            classes = meta["classes"]
        self.classes = list(classes) if classes is not None else [str(i) for i in range(store.num_classes)]
        self._store = {"store": store}  # not a buffer: DDP must not broadcast it, it is checkpointed apart
        self.backbone, dim = build_backbone(model.backbone, small_stem=model.small_stem)
        if cfg.init_checkpoint:
            load_backbone_from_checkpoint(self.backbone, cfg.init_checkpoint, options, arch=model.backbone)
        self.head = nn.Linear(dim, store.num_classes)

    @property
    def store(self) -> "LabelStore":
        return self._store["store"]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward(self, crops: Sequence[torch.Tensor], epoch: int = 0, step: int = 0, index: torch.Tensor | None = None):
        if index is None:
            raise ValueError("cdul needs the image index of every sample (batch column 'index')")
        views = [c for c in crops if c.shape[-1] == crops[0].shape[-1]]  # the large crops
        # The store is on the host, and so is the index the worker's feed hands over: reading the
        # batch's labels and sending them to the device waits for nothing the device is doing.
        idx = index.reshape(-1).long().cpu()
        target = to_device_async(self.store.get_soft(idx), views[0].device)
        z = self.logits(torch.cat(views)).float()
        loss = F.binary_cross_entropy_with_logits(z, target.repeat(len(views), 1))
        metrics = {"loss": loss.detach()}
        if self.cfg.update_epoch(epoch):
            # (An update epoch waits for the device once a step: every worker's new labels are
            # gathered and written to the host store before the next batch reads it.)
            with torch.no_grad():
                z_mean = z.detach().reshape(len(views), -1, z.shape[-1]).mean(0)
                latent = to_device_async(self.store.get_latent(idx), z.device)
                new = gradient_alignment_update(latent, z_mean, self.cfg.label_lr, self.cfg.label_sigma)
                self._share_label_updates(idx.to(z.device), new)
                metrics["label_change"] = (torch.sigmoid(new) - torch.sigmoid(latent)).abs().mean()
        return loss, metrics

    def _share_label_updates(self, idx: torch.Tensor, new: torch.Tensor) -> None:
        """Every worker's new latent labels, written to this replica of the store."""
        self.store.set_latent(dist.all_gather_cat(idx).cpu(), dist.all_gather_cat(new).cpu())

    def loss_includes(self) -> str:
        return "per-class BCE against the label store's soft labels, gradient-alignment label updates"

    def example_columns(self, batch_size: int, generator: torch.Generator) -> dict:
        """Distinct images of the label store, by index, on the host (as the feed hands them over)."""
        rows = self.store.num_rows
        if batch_size > rows:
            raise ValueError(f"cdul: a batch of {batch_size} distinct images needs a label table of as many "
                             f"rows, this one has {rows}")
        return {"index": torch.randperm(rows, generator=generator)[:batch_size]}

    def backbone_inputs(self, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat([c for c in crops if c.shape[-1] == crops[0].shape[-1]])]

    def heads_output(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.logits(self.backbone_inputs(crops)[0])

    # -- state (the store is identical on every rank: saved once, in the shared state) ---------
    def shared_state_dict(self) -> dict:
        return {"label_store": self.store.state_dict()}

    def load_shared_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state["label_store"])

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images, size: int, device) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> (N, C) probabilities, in eval mode."""
        from rayssl.eval.features import extract_features

        feats = extract_features(self.backbone, images, size, device)
        was = self.head.training
        self.head.eval()
        out = torch.sigmoid(self.head(feats.to(self.head.weight.device)).float()).cpu()
        self.head.train(was)
        return out

    def evaluate(self, metric: str, eval_sets, size: int, device, eval_cfg=None) -> float:
        """mAP of the classifier on the held-out labelled scenes, over the classes that are scene
        shapes (NaN if none is)."""
        from rayssl.data.scenes import SHAPES
        from rayssl.eval.metrics import mean_average_precision

        test = eval_sets[1]
        cols = [(i, SHAPES.index(c)) for i, c in enumerate(self.classes) if c in SHAPES]
        if not cols:
            return math.nan
        probs = self.predict(test["image"], size, device)
        ours, theirs = zip(*cols)
        return mean_average_precision(probs[:, list(ours)], torch.from_numpy(test["labels"][:, list(theirs)]).float())


def load_backbone_from_checkpoint(backbone: nn.Module, directory: str, options: S3Options | None = None,
                                  arch: str = "") -> None:
    """Copy the backbone weights of a rayssl checkpoint or run (SwAV, MLS or MoCo), or any source
    ``model.pretrained`` takes, into ``backbone`` (``rayssl.modules.pretrained``)."""
    flag = "cdul.init_checkpoint"
    state, _ = read_weights(directory, arch, options, flag=flag)
    load_into(backbone, state, arch, directory, flag=flag)
