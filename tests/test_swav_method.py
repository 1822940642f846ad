"""SwAV's step, composed from its parts by hand: codes per code crop over [queue; batch]."""

from __future__ import annotations

import torch

from rayssl.config import ModelSection
from rayssl.losses import sinkhorn_knopp, swav_loss
from rayssl.methods.swav import SwAV, SwAVConfig


def _model(queue_length: int) -> SwAV:
    torch.manual_seed(0)
    cfg = SwAVConfig(num_prototypes=8, projection_hidden_dim=16, projection_dim=8, queue_length=queue_length,
                     queue_start_epoch=0, freeze_prototypes_iters=0)
    model = SwAV(cfg, ModelSection(backbone="resnet18", small_stem=True), num_crops=4, world_size=1)
    return model.eval()  # BatchNorm from running statistics: the same features on every call


def _crops(seed: int, b: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 16, 16, generator=g) for _ in range(2)] + \
           [torch.rand(b, 3, 8, 8, generator=g) for _ in range(2)]


def _by_hand(model: SwAV, crops: list[torch.Tensor], queue_rows: list[torch.Tensor] | None) -> torch.Tensor:
    """The loss from the module's own scores, with one 2-D Sinkhorn call per code crop."""
    b = crops[0].shape[0]
    with torch.no_grad():
        per_crop = list(model.prototypes(model.embed(crops)).split(b))
        w = model.prototypes.weight.float()
        codes = []
        for slot, i in enumerate(model.cfg.assign_crops):
            s = per_crop[i].float()
            if queue_rows is not None:
                s = torch.cat([queue_rows[slot] @ w.t(), s])
            codes.append(sinkhorn_knopp(s, 0.05, 3)[-b:])
    return swav_loss(per_crop, codes, model.cfg.assign_crops, temperature=0.1)


def test_step_without_a_queue_equals_the_loss_composed_by_hand():
    model = _model(queue_length=0)
    crops = _crops(1)
    loss, metrics = model(crops)
    torch.testing.assert_close(loss.detach(), _by_hand(model, crops, None), atol=1e-6, rtol=1e-6)
    assert metrics["queue_in_use"].item() == 0.0


def test_step_with_a_full_queue_uses_each_code_crops_own_queue_rows():
    model = _model(queue_length=8)
    # Two steps fill the 8-row queue with 4 rows per step of each code crop's embeddings.
    for seed in (1, 2):
        model(_crops(seed))
    assert model.queue.is_full
    rows = [model.queue.field(slot).clone() for slot in range(2)]
    assert not torch.equal(rows[0], rows[1])  # the slots differ, so mixing them up would show
    crops = _crops(3)
    expected = _by_hand(model, crops, rows)
    loss, metrics = model(crops)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-6)
    assert metrics["queue_in_use"].item() == 1.0
    # Swapping the slots' queue rows gives a different loss: the test can tell them apart.
    assert (_by_hand(model, crops, rows[::-1]) - expected).abs() > 1e-4
