"""MLS: Multi-Label Self-supervised learning (Zhu, Fu, Wu, ICCV 2023, arXiv:2308.03286),
and its baseline MoCo-v2 (Chen et al. 2020, arXiv:2003.04297) as the same method with lam = 0.

Pure PyTorch. One ``forward`` is one training step's computation up to the loss, in
MoCo's order (He et al. 2020, arXiv:1911.05722, Alg. 1):

1. queries from the online encoder on view 1: g1 = phi(x1), z1 = f(g1) (both L2-normalised);
2. momentum update of the key encoder from the current online weights (those the
   optimiser produced at the end of the previous step), then keys from view 2:
   g2 = phi_m(x2), z2 = f_m(g2), with MoCo's shuffled BatchNorm across workers;
3. L = InfoNCE(z1, z2, Q_z) + lam * BCE(sigmoid(z1 Q_z^T / tau), top-k(g1 Q_g^T))
   (MLS Sec. 3, Fig. 2), against the queues as they were *before* this step;
4. the keys (g2, z2) of every worker are all-gathered and pushed into the single
   two-field queue in one call, so Q_g and Q_z stay aligned slot for slot.

The InfoNCE term is MoCo-v2's asymmetric one (view 1 queries, view 2 keys), as in
MoCo-v2's official recipe; the loss is not symmetrised over the two views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from rayssl import dist
from rayssl.data.tensors import to_device_async
from rayssl.losses import infonce_loss, mls_loss
from rayssl.methods.base import Method, MethodConfig, register
from rayssl.modules.backbone import build_backbone
from rayssl.modules.heads import ProjectionMLP
from rayssl.modules.momentum import ema_update_, momentum_copy
from rayssl.modules.queue import FeatureQueue
from rayssl.sections import DataSection, ModelSection, RunSection, check
from rayssl.space import choice, loguniform, uniform

__all__ = ["MLS", "MLSConfig", "MoCoConfig"]

# The random initial queue is drawn from its own generator so that every worker builds
# the same queue whatever the state of its global RNG (the queue is global, not per rank).
_QUEUE_INIT_SEED = 20230807


@dataclass
class MLSConfig(MethodConfig):
    """MLS hyper-parameters; defaults are the paper's COCO settings (MoCo-v2 + MLS, Sec. 4.1)."""

    section: ClassVar[str] = "mls"  # the YAML section / CLI method name, used in error messages

    queue_size: int = 4096  # D, entries in each of Q_g and Q_z (global: the same on every worker)
    k: int = 20  # positives per query among the D entries of Q_g
    temperature: float = 0.2  # tau of both InfoNCE and the BCE logits
    lam: float = 0.5  # weight of the multi-label (BCE) term; 0 is MoCo-v2
    momentum: float = 0.995  # m of the momentum encoder
    projection_hidden_dim: int = 2048  # MoCo-v2 head: Linear-ReLU-Linear
    projection_dim: int = 128
    shuffle_bn: bool = True  # MoCo's shuffled BN for the keys when there are several workers

    def __post_init__(self) -> None:
        s = self.section
        check(self.queue_size >= 1, f"{s}.queue_size", f"must be >= 1, got {self.queue_size}")
        check(self.lam >= 0, f"{s}.lam", f"must be >= 0 (0 turns the multi-label term off), got {self.lam}")
        if self.lam > 0:
            # Only the multi-label term uses k; MoCo (lam = 0) may shrink the queue freely.
            check(self.k >= 1, f"{s}.k", f"must be >= 1, got {self.k}")
            check(
                self.k < self.queue_size,
                f"{s}.k",
                f"must be smaller than {s}.queue_size={self.queue_size} (k of the D queue entries become "
                f"positives and at least one must stay negative), got k={self.k}",
            )
        check(self.temperature > 0, f"{s}.temperature", f"must be > 0, got {self.temperature}")
        check(0 <= self.momentum < 1, f"{s}.momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.projection_hidden_dim >= 1, f"{s}.projection_hidden_dim", "must be >= 1")
        check(self.projection_dim >= 1, f"{s}.projection_dim", "must be >= 1")

    def validate_with(self, run: RunSection, data: DataSection) -> None:
        """Checks that need the other sections (global batch, crops)."""
        s = self.section
        batch = run.batch_size
        check(
            self.queue_size % batch == 0,
            f"{s}.queue_size",
            f"{self.queue_size} is not a multiple of the global batch run.batch_size={batch}: every step "
            "enqueues the keys all-gathered from all workers (one global batch) at once, and a multiple "
            "makes the queue hold exactly the keys of the last queue_size / batch_size steps",
        )
        check(
            sum(data.crop_counts) >= 2,
            "data.crop_counts",
            f"{s} needs two views per image (the first two crops), got {sum(data.crop_counts)}",
        )

    def fit_batch(self, batch_size: int, workers: int) -> dict:
        """The queue a whole number of global batches (at least one)."""
        return {"queue_size": max(batch_size, (self.queue_size // batch_size) * batch_size)}

    def warmup_steps(self, batch_size: int) -> int:
        """Steps until the queue holds real keys only (the multi-label term starts then)."""
        return -(-self.queue_size // batch_size) if self.lam > 0 else 0


@dataclass
class MoCoConfig(MLSConfig):
    """MoCo-v2 (Chen et al. 2020, arXiv:2003.04297): MLS with the multi-label term off."""

    section: ClassVar[str] = "moco"

    lam: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.lam == 0, "moco.lam", f"moco is MLS without the multi-label term (lam = 0); use "
                                          f"--method mls for lam > 0, got {self.lam}")


# The quick preset's MLS / MoCo-v2: two 64 px views only (no small crops) and SGD, as MoCo-v2
# trains; a 1024-row queue so the multi-label term is on for most of the 256 steps.
_QUICK_VIEWS = {
    "data": {"crop_sizes": [64], "crop_counts": [2], "min_scale": [0.25], "max_scale": [1.0]},
    "optim": {"optimizer": "sgd", "base_lr": 0.12, "weight_decay": 1e-4, "warmup_epochs": 1.0},
}
_QUICK_HEAD = {"queue_size": 1024, "momentum": 0.99, "projection_hidden_dim": 512, "projection_dim": 128}
# MoCo-v2's own recipe on real data: two 224 px views at scale (0.2, 1), colour jitter 0.4
# (hue 0.1) with p 0.8, grayscale 0.2, blur 0.5 (the data defaults are SwAV's multi-crop, whose
# six small crops MLS/MoCo would never use); SGD lr 0.03 per 256 images, no warmup.
_PAPER = {"data": {"crop_sizes": [224], "crop_counts": [2], "min_scale": [0.2], "max_scale": [1.0],
                   "color_jitter": 0.4},
          "optim": {"optimizer": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0}}
_SCENES_NOTE = ("at the default CPU budget MoCo-v2 and MLS with SGD ended below their random-init backbone on the "
                "built-in scenes in every seed measured (with AdamW MoCo-v2 ended above it); the install is not "
                "broken, the backbone needs a longer run")


@register(
    "moco", config=MoCoConfig, metric="linear_map",
    summary="MoCo-v2: momentum encoder + InfoNCE against a queue; MLS with lam = 0 (Chen et al. 2020)",
    presets={"quick": {**_QUICK_VIEWS, "moco": _QUICK_HEAD}, "paper": _PAPER},
    space={"moco.temperature": loguniform(0.1, 0.3), "moco.queue_size": choice(1024, 4096),
           "optim.base_lr": loguniform(0.01, 0.3)},
    scenes_note=_SCENES_NOTE,
)
@register(
    "mls", config=MLSConfig, metric="linear_map",
    summary="MLS: MoCo-v2 + top-k multi-label BCE against an aligned pair of queues (Zhu, Fu, Wu 2023)",
    presets={"quick": {**_QUICK_VIEWS, "mls": {**_QUICK_HEAD, "k": 10}}, "paper": _PAPER},
    # k positives (ablated 1/5/20/40), tau, the BCE weight lambda and the queue size D; k stays
    # below the smallest D.
    space={"mls.k": choice(1, 5, 20, 40), "mls.temperature": loguniform(0.1, 0.3), "mls.lam": uniform(0.1, 1.0),
           "mls.queue_size": choice(1024, 4096), "optim.base_lr": loguniform(0.01, 0.3)},
    scenes_note=_SCENES_NOTE,
)
class MLS(Method):
    """Online encoder (backbone + MoCo-v2 projector), its momentum copy, and the two-field queue.

    Args:
        cfg: an :class:`MLSConfig` (or :class:`MoCoConfig`).
        model: the model section (backbone name, small stem).
        num_crops: crops per image the loop will pass; the first two are the two views,
            further crops are ignored (MoCo-v2 and MLS use two 224 px views, no multi-crop).
        world_size: accepted for the common method interface; the queue is global (D rows
            on every worker), so it does not depend on it.

    The queue (``field(0)`` = Q_g, (D, d_g); ``field(1)`` = Q_z, (D, d_z); newest first) is
    kept out of the module's buffers, like SwAV's, so that DDP does not broadcast it and
    it is checkpointed through ``rank_state_dict``. It starts as random unit vectors, as in
    MoCo, so InfoNCE has D negatives from the first step; its ``filled`` count tracks how
    many rows hold real keys. The multi-label term is switched on only once every row
    holds a real key (after D / global-batch steps): before that, the top-k of g1 against
    random vectors would produce labels that mean nothing.
    """

    def __init__(self, cfg: MLSConfig, model: ModelSection, num_crops: int = 2, world_size: int | None = None,
                 options=None):
        super().__init__()
        if num_crops < 2:
            raise ValueError(f"{cfg.section} needs at least 2 crops (two views) per image, got {num_crops}")
        self.cfg = cfg
        self.num_crops = num_crops
        self.backbone, feat_dim = build_backbone(model.backbone, small_stem=model.small_stem)
        # MoCo-v2's head: fc-ReLU-fc without BatchNorm.
        self.projector = ProjectionMLP(feat_dim, cfg.projection_hidden_dim, cfg.projection_dim, batchnorm=False)
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_projector = momentum_copy(self.projector)

        queue = FeatureQueue(cfg.queue_size, (feat_dim, cfg.projection_dim))
        gen = torch.Generator().manual_seed(_QUEUE_INIT_SEED)
        with torch.no_grad():
            for i in range(queue.num_fields):
                buf = queue.field(i)
                # Write the rows but leave ``filled`` at 0: these are not keys.
                buf.copy_(F.normalize(torch.randn(buf.shape, generator=gen), dim=1))
        # Held in a dict so nn.Module does not register it (see class docstring).
        # "full" caches queue.is_full (which never reverts) to avoid a device sync per step.
        self._per_rank = {"queue": queue, "full": False}

    @property
    def queue(self) -> FeatureQueue:
        return self._per_rank["queue"]

    def _apply(self, fn, *args, **kwargs):  # keep the queue on the module's device
        out = super()._apply(fn, *args, **kwargs)
        self.queue._apply(fn, *args, **kwargs)
        return out

    def _queue_full(self) -> bool:
        if not self._per_rank["full"]:
            self._per_rank["full"] = self.queue.is_full
        return self._per_rank["full"]

    # -- encoders ------------------------------------------------------------------------
    def queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Online encoder: x (B, 3, h, w) -> (g1 (B, d_g), z1 (B, d_z)), L2-normalised float32."""
        g = self.backbone(x)
        z = self.projector(g)
        # Normalised in float32 (outputs may be bf16 under autocast): these vectors rank the
        # queue for the top-k labels, and bf16 rounding would turn close ranks into ties.
        return F.normalize(g.float(), dim=1), F.normalize(z.float(), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum encoder: x (B, 3, h, w) -> (g2 (B, d_g), z2 (B, d_z)), L2-normalised float32, no grad.

        Row b of the outputs always belongs to sample b of ``x``. With several workers and
        ``shuffle_bn``, the global batch is permuted across workers before the forward and
        put back after it (MoCo Sec. 3.3 "Shuffling BN"): each worker's BatchNorm then sees
        key statistics from a different subset of samples than its queries, so the model
        cannot use BN statistics to spot the positive key (the permutation is ``step``'s).
        Collective when it shuffles.
        """
        shuffle = self.cfg.shuffle_bn and dist.world_size() > 1
        if shuffle:
            x, _, back = _shuffle_across_workers(x, step)
        g = self.momentum_backbone(x)
        z = self.momentum_projector(g)
        g, z = F.normalize(g.float(), dim=1), F.normalize(z.float(), dim=1)  # float32, like the queue
        if shuffle:
            both = _unshuffle_across_workers(torch.cat([g, z], dim=1), back)
            g, z = both[:, : g.shape[1]], both[:, g.shape[1]:]
        return g, z

    # -- one step ------------------------------------------------------------------------
    def forward(self, crops: Sequence[torch.Tensor], epoch: int = 0, step: int = 0):
        """One MLS / MoCo-v2 step up to the loss. Collective (all-gather) with several workers.

        Args:
            crops: at least 2 tensors (B, 3, h, w); crops[0] is view 1 (queries),
                crops[1] view 2 (keys); the rest are ignored.

        Returns:
            (loss, metrics): loss = loss_nce + lam * loss_ml; metrics are detached scalars
            ``loss``, ``loss_nce``, ``loss_ml`` (0 while the term is off) and ``ml_active``
            (1.0 when the multi-label term was computed this step).
        """
        if len(crops) < 2:
            raise ValueError(f"{self.cfg.section} needs two views per image, got {len(crops)} crop(s)")
        x1, x2 = crops[0], crops[1]
        if x1.shape[0] != x2.shape[0]:
            raise ValueError(f"the two views have different batch sizes: {x1.shape[0]} and {x2.shape[0]}")

        g1, z1 = self.queries(x1)
        with torch.no_grad():
            # MoCo order: update the key encoder just before computing keys, from the online
            # weights the optimiser left at the end of the previous step.
            ema_update_(self.momentum_backbone, self.backbone, self.cfg.momentum)
            ema_update_(self.momentum_projector, self.projector, self.cfg.momentum)
            g2, z2 = self.keys(x2, step)

        queue = self.queue
        # A copy, because the enqueue below writes the buffer in place while autograd still
        # holds it for the backward pass of the logits.
        q_z = queue.field(1).clone()
        loss_nce = infonce_loss(z1, z2, q_z, self.cfg.temperature)
        ml_active = self.cfg.lam > 0 and self._queue_full()
        if ml_active:
            # Q_g enters only the label computation (no gradient), so it needs no copy.
            loss_ml = mls_loss(g1.detach(), z1, queue.field(0), q_z, k=self.cfg.k, temperature=self.cfg.temperature)
            loss = loss_nce + self.cfg.lam * loss_ml
        else:
            loss_ml = torch.zeros((), device=loss_nce.device)
            loss = loss_nce

        # One call for both fields: the all-gathered g2 and z2 land in the same slots.
        queue.enqueue(g2, z2, gather=True)

        metrics = {
            "loss": loss.detach(),
            "loss_nce": loss_nce.detach(),
            "loss_ml": loss_ml.detach(),
            "ml_active": torch.full((), float(ml_active), device=loss.device),  # no host copy
        }
        return loss, metrics

    def backbone_loaded(self) -> None:
        """The momentum encoder starts as a copy of the online one, pretrained weights included."""
        with torch.no_grad():
            self.momentum_backbone.load_state_dict(self.backbone.state_dict())

    def loss_includes(self) -> str:
        bce = " + multi-label BCE" if self.cfg.lam > 0 else ""
        return f"momentum-encoder forward (shuffled BN), queue all-gather, InfoNCE{bce}"

    def backbone_inputs(self, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [crops[0]]  # the online encoder sees view 1; view 2 goes to the momentum encoder

    def heads_output(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        g, z = self.queries(crops[0])
        return torch.cat([g, z], dim=1)

    # -- per-rank state --------------------------------------------------------------------
    replicated_rank_state = True  # the queue of the global batch's keys, the same on every worker

    def rank_state_dict(self) -> dict:
        return {"queue": self.queue.state_dict()}

    def load_rank_state_dict(self, state: dict) -> bool:
        """Restore the queue exactly; returns False when it does not fit (other D or widths)."""
        saved = state.get("queue") if isinstance(state, dict) else None
        if saved is None:
            return False
        try:
            self.queue.load_state_dict(saved)
        except RuntimeError:
            return False
        self._per_rank["full"] = False  # re-read from the restored fill count
        return True


# Seeds the permutation of MoCo's shuffled BN: drawn from a generator seeded by this and the step,
# the same on every worker without a collective (the official code draws it on rank 0 and
# broadcasts it) and without a device sync (its split sizes are read on the host).
SHUFFLE_SEED = 0x5EED_B17


def _shuffle_plan(perm: torch.Tensor, b: int, rank: int, world: int):
    """How rows move for the permutation ``perm`` of the global batch (on the host): (the local rows
    in sending order, rows sent to each worker, the receiving order, rows received from each)."""
    n = world * b
    place = torch.empty(n, dtype=torch.long)
    place[perm] = torch.arange(n)  # place[g]: where global row g stands in perm
    mine = place[rank * b:(rank + 1) * b]  # worker mine // b encodes my row, at mine % b of its share
    owners = perm[rank * b:(rank + 1) * b] // b  # the worker that holds each row of my share
    # Sent grouped by destination, each group in the order of the destination's share; received
    # grouped by owner, each group in the order of this worker's share.
    return (torch.argsort(mine), torch.bincount(mine // b, minlength=world).tolist(),
            torch.argsort(owners * b + torch.arange(b)), torch.bincount(owners, minlength=world).tolist())


class _Moves(NamedTuple):
    """One direction of the shuffle's all-to-all: the rows taken in ``take`` order (on the device)
    go out ``sent[r]`` to worker r; the rows that arrive, ``received[s]`` from worker s, are put
    at ``put``."""
    take: torch.Tensor
    sent: list[int]
    put: torch.Tensor
    received: list[int]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rows = dist.all_to_all_rows(x[self.take], self.sent, self.received)
        out = torch.empty_like(x)
        out[self.put] = rows
        return out


def _shuffle_across_workers(x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, _Moves]:
    """This worker's share of a random permutation of the global batch.

    x: (B, ...) local samples. Returns (x_shuffled (B, ...), perm (world * B,), the moves back):
    worker r gets global rows ``perm[r*B:(r+1)*B]``, where global row ``r*B + b`` is sample b of
    worker r. Every worker draws the same ``perm`` (``SHUFFLE_SEED``, ``step``), and each row
    travels once, straight to the worker that encodes it (one all-to-all): a worker sends and
    receives B rows whatever the number of workers, where gathering the whole batch on every
    worker (the official code) grows with it. The plan is made once, on the host, and its orders
    sent to the device once; the way back (``_unshuffle_across_workers``) is the same moves reversed.
    """
    b, world, rank = x.shape[0], dist.world_size(), dist.rank()
    perm = torch.randperm(world * b, generator=torch.Generator().manual_seed(SHUFFLE_SEED + step))
    send_order, sent, recv_order, received = _shuffle_plan(perm, b, rank, world)
    send_order, recv_order = to_device_async(torch.stack([send_order, recv_order]), x.device)
    return _Moves(send_order, sent, recv_order, received).apply(x), perm, _Moves(recv_order, received, send_order, sent)


def _unshuffle_across_workers(y: torch.Tensor, back: _Moves) -> torch.Tensor:
    """Inverse of :func:`_shuffle_across_workers` for per-sample outputs y (B, ...): each row
    goes back to the worker that holds its sample, in that worker's order."""
    return back.apply(y)
