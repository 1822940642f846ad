"""SwAV's step against an independent transcription of the official training step.

The reference below restates, in this test's own code, what one iteration of the official
``main_swav.py`` (facebookresearch/swav, ``train`` and ``distributed_sinkhorn``) computes, one
operation at a time and without any of rayssl's loss or queue code:

1. re-normalise the prototype vectors to unit length;
2. embed every crop (same network: backbone, projection head, L2 norm) and score it
   against the prototypes;
3. for each code crop i: the detached scores of that crop, preceded by the scores of the
   queue's rows when the queue is full (its last row non-zero); then the queue shifts down
   by one batch and takes that crop's embeddings on top (newest first); the codes are the
   last B columns of Sinkhorn-Knopp: Q = exp(scores / eps)^T, divide by its sum, then
   per iteration divide rows by their sums and by K, columns by their sums and by B_total;
   finally multiply by B_total;
4. loss = mean over code crops of [sum over the other crops v of
   -mean_b sum_k q_bk log softmax(scores_v / tau)_bk] / (crops - 1);
5. after backward, the prototypes' gradient is dropped while iteration < freeze.

rayssl's SwAV module (queue kept per worker from ``swav.queue_start_epoch``, stacked
Sinkhorn call, max-shifted exponent) must give the same loss, the same gradients on every
parameter and the same queue, step after step, on one process.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from rayssl.config import ModelSection
from rayssl.methods.swav import SwAV, SwAVConfig

EPS, ITERS, TAU = 0.05, 3, 0.1


def official_sinkhorn(out: torch.Tensor) -> torch.Tensor:
    q = torch.exp(out / EPS).t()  # K x B
    total_b, k = q.shape[1], q.shape[0]  # one process: world size 1
    q = q / q.sum()
    for _ in range(ITERS):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / total_b
    return (q * total_b).t()


def official_step(model: SwAV, crops, queue: torch.Tensor | None, iteration: int, freeze: int):
    """One iteration of the official loop on ``model``'s network; returns (loss, queue)."""
    with torch.no_grad():
        w = model.prototypes.layer.weight
        w.copy_(F.normalize(w.data.clone(), dim=1, p=2))
    sizes = [c.shape[-1] for c in crops]
    feats, start = [], 0
    while start < len(crops):  # crops of one resolution go through the backbone together
        end = start
        while end < len(crops) and sizes[end] == sizes[start]:
            end += 1
        feats.append(model.backbone(torch.cat(crops[start:end])))
        start = end
    embedding = F.normalize(model.projector(torch.cat(feats)), dim=1, p=2)
    output = model.prototypes.layer(embedding)
    embedding = embedding.detach()
    bs, n_crops = crops[0].shape[0], len(crops)
    loss = 0
    for i, crop_id in enumerate(model.cfg.assign_crops):
        with torch.no_grad():
            out = output[bs * crop_id:bs * (crop_id + 1)].detach()
            if queue is not None:
                if not torch.all(queue[i, -1, :] == 0):
                    out = torch.cat((queue[i] @ model.prototypes.layer.weight.t(), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = embedding[crop_id * bs:(crop_id + 1) * bs]
            q = official_sinkhorn(out)[-bs:]
        subloss = 0
        for v in [v for v in range(n_crops) if v != crop_id]:
            x = output[bs * v:bs * (v + 1)] / TAU
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss = loss + subloss / (n_crops - 1)
    loss = loss / len(model.cfg.assign_crops)
    model.zero_grad(set_to_none=True)
    loss.backward()
    if iteration < freeze:
        for name, p in model.named_parameters():
            if "prototypes" in name:
                p.grad = None
    return loss, queue


def _crops(seed: int, b: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 16, 16, generator=g) for _ in range(2)] + [torch.rand(b, 3, 8, 8, generator=g)
                                                                        for _ in range(3)]


def test_swav_step_equals_the_official_step_with_queue_and_frozen_prototypes():
    b, queue_length, freeze = 4, 8, 2
    torch.manual_seed(0)
    cfg = SwAVConfig(num_prototypes=12, projection_hidden_dim=32, projection_dim=16, queue_length=queue_length,
                     queue_start_epoch=0, freeze_prototypes_iters=freeze, epsilon=EPS, sinkhorn_iterations=ITERS,
                     temperature=TAU)
    ours = SwAV(cfg, ModelSection(backbone="resnet18", small_stem=True), num_crops=5, world_size=1).eval()
    ref = copy.deepcopy(ours)
    with torch.no_grad():  # prototypes far from unit length: the re-normalisation must happen in both
        for m in (ours, ref):
            m.prototypes.layer.weight.mul_(3.0)
    queue = torch.zeros(len(cfg.assign_crops), queue_length, cfg.projection_dim)
    used_queue = False
    for step in range(5):  # the queue fills after 2 steps and is used from the third
        crops = _crops(step, b)
        loss_ref, queue = official_step(ref, crops, queue, step, freeze)
        ours.zero_grad(set_to_none=True)
        loss, metrics = ours(crops, epoch=0, step=step)
        loss.backward()
        ours.after_backward(step)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        for (name, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
            if r.grad is None:
                assert p.grad is None, f"step {step}: {name} has a gradient the official step drops"
            else:
                torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        for slot in range(len(cfg.assign_crops)):
            torch.testing.assert_close(ours.queue.field(slot), queue[slot])
        used_queue |= bool(metrics["queue_in_use"].item())
        with torch.no_grad():  # the same SGD step on both, so the next step starts equal
            for p, r in zip(ours.parameters(), ref.parameters()):
                if p.grad is not None:
                    p -= 0.05 * p.grad
                    r -= 0.05 * r.grad
    assert used_queue
    assert ours.prototypes.layer.weight.grad is not None  # unfrozen after `freeze` steps
