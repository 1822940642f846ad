"""SwAV: Swapping Assignments between multiple Views (Caron et al. 2020, arXiv:2006.09882).

Pure PyTorch. One ``forward`` is one training step's computation up to the loss:
backbone over the multi-crop views (same-size crops batched together), projection,
L2 normalisation, prototype scores, codes from distributed Sinkhorn-Knopp for the two
large crops (optionally with a queue of past embeddings), and the swapped-prediction loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from rayssl import dist
from rayssl.losses import sinkhorn_knopp, swav_loss
from rayssl.methods.base import Method, MethodConfig, group_same_size, register
from rayssl.modules.backbone import build_backbone
from rayssl.modules.heads import Prototypes, ProjectionMLP
from rayssl.modules.queue import FeatureQueue
from rayssl.sections import DataSection, ModelSection, RunSection, check
from rayssl.space import choice, loguniform

__all__ = ["SwAV", "SwAVConfig", "group_same_size"]


@dataclass
class SwAVConfig(MethodConfig):
    """SwAV hyper-parameters; defaults are the paper's ImageNet settings."""

    section: ClassVar[str] = "swav"

    num_prototypes: int = 3000
    projection_hidden_dim: int = 2048
    projection_dim: int = 128
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    queue_length: int = 3840  # over all workers (each keeps queue_length / workers); 0: no queue
    queue_start_epoch: int = 15
    freeze_prototypes_iters: int = 313  # one epoch of ImageNet at batch 4096
    assign_crops: list[int] = field(default_factory=lambda: [0, 1])

    def __post_init__(self) -> None:
        check(self.num_prototypes >= 1, "swav.num_prototypes", f"must be >= 1, got {self.num_prototypes}")
        check(self.projection_dim >= 1, "swav.projection_dim", "must be >= 1")
        check(self.projection_hidden_dim >= 1, "swav.projection_hidden_dim", "must be >= 1")
        check(self.temperature > 0, "swav.temperature", f"must be > 0, got {self.temperature}")
        check(self.epsilon > 0, "swav.epsilon", f"must be > 0, got {self.epsilon}")
        check(self.sinkhorn_iterations >= 1, "swav.sinkhorn_iterations", "must be >= 1")
        check(self.queue_length >= 0, "swav.queue_length", "must be >= 0 (0 disables the queue)")
        check(self.queue_start_epoch >= 0, "swav.queue_start_epoch", "must be >= 0")
        check(self.freeze_prototypes_iters >= 0, "swav.freeze_prototypes_iters", "must be >= 0")
        check(len(self.assign_crops) >= 1, "swav.assign_crops", "needs at least one crop index")
        check(len(set(self.assign_crops)) == len(self.assign_crops), "swav.assign_crops", "indices repeat")

    def validate_with(self, run: RunSection, data: DataSection) -> None:
        """Checks that need the other sections (workers, batch, crops)."""
        n_large = data.crop_counts[0]
        check(
            all(0 <= i < n_large for i in self.assign_crops),
            "swav.assign_crops",
            f"codes are computed for large crops only: indices must be in [0, {n_large})",
        )
        if self.queue_length:
            for workers in run.worker_counts:
                local_batch = run.batch_size // workers
                check(
                    self.queue_length % workers == 0,
                    "swav.queue_length",
                    f"{self.queue_length} is not divisible by run.num_workers={workers} (each worker keeps an "
                    "equal share)",
                )
                check(
                    self.queue_length // workers >= local_batch,
                    "swav.queue_length",
                    f"each worker's queue ({self.queue_length // workers}) must hold at least its batch "
                    f"({local_batch})",
                )

    def fit_batch(self, batch_size: int, workers: int) -> dict:
        """Each worker's queue share a whole number of rows, at least its batch."""
        if not self.queue_length:
            return {}
        per = max(batch_size // workers, self.queue_length // workers)
        return {"queue_length": per * workers}

    def warmup_steps(self, batch_size: int) -> int:
        """Steps until the queue is full (it is used only then)."""
        return -(-self.queue_length // batch_size)


# The quick preset's SwAV: 32 px scenes through the small-image stem (3x3 stride-1 conv, no
# max-pool), 4 epochs, 256 prototypes, no queue. With the standard stem on 64 px scenes a 32 px
# crop is 1 x 1 at layer4 and SwAV ended below its random init on every recipe tried
# (docs/results/swav-on-scenes.md); with the small stem its kNN ended above its own random init
# on 6 of 8 seeds (mean +0.016, s.e. 0.007) at 128 steps (experiments/swav_trials.py). The small
# stem costs about 2.7x a step, so the run is 4 epochs, not 8, to stay within 10 minutes on 2 CPU
# cores.
_QUICK = {
    "run": {"epochs": 4},
    "data": {"scenes_image_size": 32, "crop_sizes": [32, 16]},
    "model": {"small_stem": True},
    "swav": {"num_prototypes": 256, "projection_hidden_dim": 512, "projection_dim": 128, "queue_length": 0,
             "freeze_prototypes_iters": 32},
}


@register(
    "swav", config=SwAVConfig, metric="knn_top1",
    summary="SwAV: online clustering with distributed Sinkhorn-Knopp and multi-crop (Caron et al. 2020)",
    presets={"quick": _QUICK},
    # K, epsilon and tau of the swapped prediction; the queue (length and first epoch) is what
    # makes or breaks small-batch runs.
    space={"swav.num_prototypes": choice(256, 1000, 3000), "swav.epsilon": loguniform(0.02, 0.1),
           "swav.temperature": loguniform(0.05, 0.2), "swav.queue_length": choice(0, 3840),
           "swav.queue_start_epoch": choice(1, 5, 15), "optim.base_lr": loguniform(0.05, 0.6)},
    scenes_note=("on the built-in scenes SwAV's gain over its random init within the default budget is small "
                 "next to the spread between seeds (+0.016 +- 0.007 over eight seeds, two of which ended at or "
                 "below it); the install is not broken"),
)
class SwAV(Method):
    """Backbone + projection MLP + prototypes, with SwAV's per-worker queue.

    The queue is per-worker state that must not be broadcast by DDP (which would copy rank
    0's queue everywhere), so it is kept outside the module's buffers and checkpointed per
    rank through ``rank_state_dict``.
    """

    def __init__(self, cfg: SwAVConfig, model: ModelSection, num_crops: int, world_size: int | None = None,
                 options=None):
        super().__init__()
        self.cfg = cfg
        self.num_crops = num_crops
        self.backbone, feat_dim = build_backbone(model.backbone, small_stem=model.small_stem)
        self.projector = ProjectionMLP(feat_dim, cfg.projection_hidden_dim, cfg.projection_dim)
        self.prototypes = Prototypes(cfg.projection_dim, cfg.num_prototypes)
        self.prototypes.normalize_()
        ws = world_size if world_size is not None else dist.world_size()
        local_len = cfg.queue_length // ws if cfg.queue_length else 0
        # Held in a dict so nn.Module does not register it (see class docstring).
        self._per_rank = {
            "queue": FeatureQueue(local_len, [cfg.projection_dim] * len(cfg.assign_crops)) if local_len else None
        }

    @property
    def queue(self) -> FeatureQueue | None:
        return self._per_rank["queue"]

    def _apply(self, fn, *args, **kwargs):  # keep the queue on the module's device
        out = super()._apply(fn, *args, **kwargs)
        if self.queue is not None:
            self.queue._apply(fn, *args, **kwargs)
        return out

    def embed(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Crops (each (B, 3, h, w)) -> L2-normalised projections (n_crops * B, d), crop-major."""
        feats = [self.backbone(x) for x in group_same_size(crops)]
        z = self.projector(torch.cat(feats))
        return F.normalize(z, dim=1, p=2)

    def forward(self, crops: Sequence[torch.Tensor], epoch: int = 0, step: int = 0):
        """One SwAV step up to the loss.

        Args:
            crops: ``num_crops`` tensors (B, 3, h_i, w_i), the two large crops first.
        Returns:
            (loss, metrics) with metrics detached scalars.
        """
        if len(crops) != self.num_crops:
            raise ValueError(f"expected {self.num_crops} crops, got {len(crops)}")
        self.prototypes.normalize_()
        b = crops[0].shape[0]
        z = self.embed(crops)
        scores = self.prototypes(z)  # (n_crops*B, K)
        per_crop = list(scores.split(b))

        queue = self.queue
        use_queue = queue is not None and epoch >= self.cfg.queue_start_epoch
        with torch.no_grad():
            w = self.prototypes.weight.detach().float()
            targets = []
            for slot, i in enumerate(self.cfg.assign_crops):
                s = per_crop[i].detach().float()
                if use_queue and queue.is_full:
                    # Codes over [queue; batch] smooth the equipartition constraint when the
                    # batch is small; only the batch part is kept.
                    s = torch.cat([queue.field(slot) @ w.t(), s])
                targets.append(s)
            # One stacked call: the code crops share each collective instead of repeating it.
            codes = list(sinkhorn_knopp(torch.stack(targets), self.cfg.epsilon,
                                        self.cfg.sinkhorn_iterations)[:, -b:].unbind(0))
            if use_queue:
                zs = z.detach().split(b)
                queue.enqueue(*[zs[i] for i in self.cfg.assign_crops])

        loss = swav_loss(per_crop, codes, assign_crops=self.cfg.assign_crops, temperature=self.cfg.temperature)
        with torch.no_grad():
            assigned = torch.cat([c.argmax(dim=1) for c in codes])
            used = torch.zeros(self.cfg.num_prototypes, device=assigned.device)
            used.index_fill_(0, assigned, 1.0)
        metrics = {
            "loss": loss.detach(),
            "prototypes_used_in_batch": used.sum(),
            "queue_in_use": torch.tensor(float(use_queue and queue.is_full)),
        }
        return loss, metrics

    def after_backward(self, step: int) -> None:
        """Prototypes get no update for the first ``freeze_prototypes_iters`` steps (paper, sec. B.1)."""
        if step < self.cfg.freeze_prototypes_iters:
            self.prototypes.layer.weight.grad = None

    def collapse_classes(self) -> int:
        return self.cfg.num_prototypes

    def progress_text(self, metrics: Mapping[str, torch.Tensor]) -> str:
        return f" protos_used={int(metrics['prototypes_used_in_batch'].item())}"

    def loss_includes(self) -> str:
        return "Sinkhorn-Knopp codes (float32), queue, swapped-prediction loss"

    def heads_output(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.prototypes(self.embed(crops))

    def extra_timings(self, batch_size: int, device) -> dict:
        """Sinkhorn alone on one step's score shapes: one stacked call for all code crops."""
        rows = batch_size + (self.queue.length if self.queue is not None else 0)
        scores = torch.randn(len(self.cfg.assign_crops), rows, self.cfg.num_prototypes, device=device).clamp_(-1, 1)
        return {"sinkhorn_ms": lambda: sinkhorn_knopp(scores, self.cfg.epsilon, self.cfg.sinkhorn_iterations)}

    # -- per-rank state --------------------------------------------------------------------
    def rank_state_dict(self) -> dict:
        return {"queue": self.queue.state_dict() if self.queue is not None else None}

    def load_rank_state_dict(self, state: dict) -> bool:
        """Restore this rank's queue; returns False when it does not fit (e.g. workers changed)."""
        if self.queue is None or state.get("queue") is None:
            return self.queue is None and state.get("queue") is None
        try:
            self.queue.load_state_dict(state["queue"])
        except RuntimeError:
            return False
        return True
