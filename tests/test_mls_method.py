"""The MLS / MoCo-v2 method: momentum encoder, distributed aligned queue, checkpointed
queue state, learning signal, the MoCo special case, and config validation."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from rayssl.config import Config, ConfigError, ModelSection
from rayssl.dist import free_port, init_local_gloo
from rayssl.methods import get_method
from rayssl.methods import mls as mls_module
from rayssl.methods.mls import MLS, MLSConfig, MoCoConfig, _shuffle_across_workers, _shuffle_plan
from rayssl.modules.momentum import ema_update_, momentum_copy

TINY = dict(queue_size=16, k=3, temperature=0.2, momentum=0.9, projection_hidden_dim=32, projection_dim=8)
MODEL = ModelSection(backbone="resnet18", small_stem=True)
SIZE = 16  # px; the small stem keeps 2x2 maps at layer4


_BUILT: dict[tuple, MLS] = {}


def tiny(cls=MLSConfig, **over) -> MLS:
    """A fresh tiny model; same config -> same initial weights (built once, then copied)."""
    key = (cls, tuple(sorted(over.items())))
    if key not in _BUILT:  # building a ResNet costs far more than copying one
        torch.manual_seed(0)
        _BUILT[key] = MLS(cls(**{**TINY, **over}), MODEL, num_crops=2)
    return copy.deepcopy(_BUILT[key])


def views(batch: int, seed: int, size: int = SIZE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, size, size, generator=g)
    return [(base + 0.1 * torch.randn(base.shape, generator=g)).clamp(0, 1) for _ in range(2)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, two OpenMP threads spin-wait on each
    other and the same steps take ten times longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


# --------------------------------------------------------------------------- momentum encoder


def test_ema_update_rule_and_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters()))
    online(torch.randn(8, 4))  # moves the online BN running statistics
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = params(target)
    ema_update_(target, online, 0.75)
    for name, p in target.named_parameters():
        expected = 0.75 * before[name] + 0.25 * dict(online.named_parameters())[name].detach()
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
    for (name, b), (_, ob) in zip(target.named_buffers(), online.named_buffers()):
        assert torch.equal(b, ob), name
    # a torch.compile'd encoder (children under ``_orig_mod``) still pairs with a plain one
    wrapper = nn.Module()
    wrapper._orig_mod = momentum_copy(online)
    ema_update_(wrapper, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(wrapper.parameters(), online.parameters()))
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(4, 2), online, 0.5)
    with pytest.raises(ValueError):
        ema_update_(target, online, 1.5)


def test_momentum_encoder_follows_ema_and_gets_no_gradient():
    model = tiny()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    momentum_modules = [model.momentum_backbone, model.momentum_projector]
    assert all(not p.requires_grad for m in momentum_modules for p in m.parameters())

    loss, _ = model(views(4, 0))
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for m in momentum_modules for p in m.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())
    opt.step()

    old_bb, old_pj = params(model.momentum_backbone), params(model.momentum_projector)
    online_bb, online_pj = params(model.backbone), params(model.projector)
    model(views(4, 1))  # the update happens at the start of forward, from the stepped online weights
    moved = 0
    for module, old, online in ((model.momentum_backbone, old_bb, online_bb),
                                (model.momentum_projector, old_pj, online_pj)):
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.detach(), 0.9 * old[name] + 0.1 * online[name], rtol=1e-6, atol=1e-7)
            moved += int(not torch.equal(p.detach(), old[name]))
    assert moved > 0  # the optimiser step made the two encoders differ, so the EMA moved something


# --------------------------------------------------------------------------- method behaviour


def test_views_and_extra_crops():
    model = tiny()
    twin = copy.deepcopy(model)  # deep-copies the queue too
    x1, x2 = views(4, 0)
    extra = torch.rand(4, 3, 8, 8)
    loss_a, metrics = model([x1, x2])
    loss_b, _ = twin([x1, x2, extra])  # further crops are ignored
    assert torch.equal(loss_a, loss_b)
    assert set(metrics) == {"loss", "loss_nce", "loss_ml", "ml_active"}
    with pytest.raises(ValueError, match="two views"):
        model([x1])
    with pytest.raises(ValueError):
        MLS(MLSConfig(**TINY), MODEL, num_crops=1)


def test_bf16_autocast_keeps_losses_and_queue_float32():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model(views(4, 0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.queue.field(0).dtype == model.queue.field(1).dtype == torch.float32
    torch.testing.assert_close(model.queue.valid(1).norm(dim=1), torch.ones(4))


def test_queue_starts_random_unit_and_ml_waits_for_real_keys():
    model = tiny()
    q = model.queue
    assert len(q) == 0
    for i in range(2):
        torch.testing.assert_close(q.field(i).norm(dim=1), torch.ones(16))
    assert torch.equal(tiny().queue.field(0), q.field(0))  # same on every worker, whatever the RNG
    active = []
    with torch.no_grad():
        for step in range(6):  # global batch 4, D = 16: full after 4 steps
            _, m = model(views(4, step))
            active.append(m["ml_active"].item())
    assert active == [0, 0, 0, 0, 1, 1]
    assert q.is_full


def test_moco_equals_mls_without_the_multilabel_term(monkeypatch):
    mls, moco = tiny(MLSConfig), tiny(MoCoConfig)
    assert moco.cfg.lam == 0
    with torch.no_grad():
        for step in range(4):  # fill both queues with the same keys (no optimiser step)
            mls(views(4, step))
            moco(views(4, step))
    for i in range(2):
        assert torch.equal(mls.queue.field(i), moco.queue.field(i))

    def no_topk(*args, **kwargs):
        raise AssertionError("lam = 0 must skip the multi-label term")

    monkeypatch.setattr(mls_module, "mls_loss", no_topk)
    loss_moco, m_moco = moco(views(4, 9))
    monkeypatch.undo()
    loss_mls, m_mls = mls(views(4, 9))
    assert m_moco["loss_ml"].item() == 0 and m_moco["ml_active"].item() == 0
    assert m_mls["ml_active"].item() == 1 and m_mls["loss_ml"].item() > 0
    assert torch.equal(m_moco["loss_nce"], m_mls["loss_nce"])
    assert torch.equal(loss_moco, m_moco["loss_nce"])
    torch.testing.assert_close(loss_mls, m_mls["loss_nce"] + 0.5 * m_mls["loss_ml"])


def test_loss_falls_on_fixed_data():
    """20 SGD steps over 5 fixed batches of 4 images (D = 16 = the 4 previous batches).

    Not one single batch: the queue would then hold older keys of each query's own image
    as negatives, which InfoNCE cannot separate from the positive. With 5 batches cycled,
    each query's negatives are exactly the 16 other images.
    """
    model = tiny(momentum=0.99)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    data = [views(4, seed) for seed in range(5)]
    losses, active = [], []
    for step in range(20):
        loss, metrics = model(data[step % 5])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        active.append(metrics["ml_active"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # Compare from the first step with the full loss (InfoNCE against real keys + the ML
    # term): before that the random initial queue makes InfoNCE artificially easy.
    start = active.index(1.0)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[start:start + 3]) / 3, losses


def test_rank_state_round_trip_restores_the_queue_exactly():
    model = tiny()
    with torch.no_grad():
        for step in range(5):
            model(views(4, step))
    state = copy.deepcopy(model.rank_state_dict())
    fresh = tiny()
    assert fresh.load_rank_state_dict(state)
    for name, value in model.queue.state_dict().items():
        assert torch.equal(fresh.queue.state_dict()[name], value), name
    assert fresh.queue.is_full
    # the restored queue carries on like the original (and switches the ML term on at once)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        la, ma = model(views(4, 7))
        lb, mb = fresh(views(4, 7))
    assert mb["ml_active"].item() == 1 and torch.equal(la, lb)
    assert all(torch.equal(a, b) for a, b in zip(model.queue.state_dict().values(), fresh.queue.state_dict().values()))
    # a queue of another size does not fit
    assert not tiny(queue_size=32).load_rank_state_dict(state)
    assert not fresh.load_rank_state_dict({})


# --------------------------------------------------------------------------- config


def cfg(method: str, batch: int = 32, **section) -> Config:
    return Config.from_dict({"run": {"method": method, "batch_size": batch, "num_workers": 2}, method: section})


def test_config_defaults_and_registry():
    c = MLSConfig()
    assert (c.queue_size, c.k, c.temperature, c.lam, c.momentum) == (4096, 20, 0.2, 0.5, 0.995)
    assert (c.projection_hidden_dim, c.projection_dim) == (2048, 128)
    assert MoCoConfig().lam == 0.0
    for name, conf in (("mls", MLSConfig), ("moco", MoCoConfig)):
        spec = get_method(name)
        assert spec.config_cls is conf and spec.model_cls is MLS and spec.metric == "linear_map"
    assert isinstance(cfg("moco").method, MoCoConfig)


@pytest.mark.parametrize("method,section,key", [
    ("mls", {"k": 16, "queue_size": 16}, "mls.k"),
    ("mls", {"k": 40, "queue_size": 32}, "mls.k"),
    ("mls", {"queue_size": 100}, "mls.queue_size"),  # not a multiple of the global batch 32
    ("mls", {"lam": -0.1}, "mls.lam"),
    ("mls", {"temperature": 0}, "mls.temperature"),
    ("mls", {"momentum": 1.0}, "mls.momentum"),
    ("moco", {"queue_size": 48}, "moco.queue_size"),
    ("moco", {"lam": 0.5}, "moco.lam"),
])
def test_config_errors_name_the_key(method, section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg(method, **section)


def test_config_accepts_small_moco_queue():
    # k only matters for the multi-label term: MoCo may use a queue smaller than the default k
    assert cfg("moco", queue_size=16, batch=16).method.queue_size == 16


# --------------------------------------------------------------------------- two workers

WORLD, LOCAL_BATCH, STEPS, D = 2, 2, 6, 16  # global batch 4: the queue holds the last 4 steps


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_local_gloo(rank, world, port, timeout_s=60)
    try:
        model = tiny()  # identical init on both ranks, like the training loop
        recorded = []
        real_keys = model.keys

        def recording_keys(x, step=0):
            g, z = real_keys(x, step)
            recorded.append((g.clone(), z.clone()))
            return g, z

        model.keys = recording_keys
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        active = []
        for step in range(STEPS):
            loss, metrics = ddp(views(LOCAL_BATCH, 100 * step + rank), epoch=0, step=step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            active.append(metrics["ml_active"].item())

        # Shuffled BN must hand back each sample's own key: with BN on running statistics
        # the key of a sample does not depend on its batch-mates, so the shuffled path must
        # equal the plain per-sample forward row for row.
        model.momentum_backbone.eval()
        model.momentum_projector.eval()
        x = views(LOCAL_BATCH, 999 + rank)[1]
        g_sh, z_sh = real_keys(x)
        with torch.no_grad():
            raw = model.momentum_backbone(x)
            g_direct, z_direct = F.normalize(raw, dim=1), F.normalize(model.momentum_projector(raw), dim=1)
        shuffles = [_shuffle_across_workers(x, step) for step in (*range(6), 0)]
        out = {
            "queue": {k: v.clone() for k, v in model.queue.state_dict().items()},
            "rank_state": model.rank_state_dict(),
            "recorded": recorded,
            "active": active,
            "params": params(model),
            "keys_shuffled": (g_sh, z_sh),
            "keys_direct": (g_direct, z_direct),
            "x": x,
            "shuffles": shuffles,
        }
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("mls_dist")
    mp.spawn(_dist_worker, args=(WORLD, free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_distributed_queues_equal_and_hold_the_last_steps_in_order(two_workers):
    r0, r1 = two_workers
    for name in r0["queue"]:
        assert torch.equal(r0["queue"][name], r1["queue"][name]), name
    assert int(r0["queue"]["filled"]) == D
    # newest step first; within a step rank 0's samples, then rank 1's
    last = range(STEPS - 1, STEPS - 1 - D // (WORLD * LOCAL_BATCH), -1)
    for field in (0, 1):
        expected = torch.cat([r[("recorded")][s][field] for s in last for r in (r0, r1)])
        assert torch.equal(r0["queue"][f"field_{field}"], expected), field
    # the two fields hold the same sample's g and z in every slot: both were compared above
    # against the (g, z) pairs of the same call; make the pairing explicit as well
    g_rows, z_rows = r0["queue"]["field_0"], r0["queue"]["field_1"]
    pairs = {(s, r): rr["recorded"][s] for s in last for r, rr in enumerate((r0, r1))}
    slot = 0
    for s in last:
        for r in range(WORLD):
            g, z = pairs[(s, r)]
            for b in range(LOCAL_BATCH):
                assert torch.equal(g_rows[slot], g[b]) and torch.equal(z_rows[slot], z[b])
                slot += 1
    # the multi-label term switched on once the queue held D real keys, on both ranks
    assert r0["active"] == r1["active"] == [0, 0, 0, 0, 1, 1]


def test_distributed_models_stay_identical(two_workers):
    r0, r1 = two_workers
    for name, p in r0["params"].items():  # online (DDP-averaged) and momentum weights alike
        assert torch.equal(p, r1["params"][name]), name


def test_shuffled_bn_keys_belong_to_their_own_samples(two_workers):
    for r in two_workers:
        for shuffled, direct in zip(r["keys_shuffled"], r["keys_direct"]):
            torch.testing.assert_close(shuffled, direct, atol=1e-5, rtol=1e-5)
    # the shuffle is a real permutation of the global batch, shared by both ranks, and
    # sends samples across ranks at least once in these draws
    x_all = torch.cat([r["x"] for r in two_workers])
    crossed = False
    for i in range(len(two_workers[0]["shuffles"])):
        perm = two_workers[0]["shuffles"][i][1]
        assert torch.equal(perm, two_workers[1]["shuffles"][i][1])
        assert sorted(perm.tolist()) == list(range(WORLD * LOCAL_BATCH))
        for rank, r in enumerate(two_workers):
            mine = perm[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
            assert torch.equal(r["shuffles"][i][0], x_all[mine])
            crossed |= bool(((mine // LOCAL_BATCH) != rank).any())
    assert crossed
    # The permutation is the step's: the same again for the same step, another for the next.
    perms = [s[1] for s in two_workers[0]["shuffles"]]
    assert torch.equal(perms[0], perms[-1]) and not all(torch.equal(perms[0], p) for p in perms[1:-1])



@pytest.mark.parametrize("world,b", [(3, 4), (5, 3)])
def test_the_shuffle_plan_sends_each_row_once_to_the_worker_that_encodes_it(world, b):
    """The all-to-all of shuffled BN, played out in one process for more workers than the run
    above: each worker's rows, sent in the plan's order and split sizes, land on the worker whose
    share of the permutation names them, in that share's order; sent back with the sizes
    swapped, they come home in their own order."""
    n = world * b
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)  # global row g = sample g % b of worker g // b
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(world))
    plans = [_shuffle_plan(perm, b, r, world) for r in range(world)]

    def exchange(rows_of, sizes_sent):  # all_to_all_single, by hand: chunks by destination, received by source
        chunks = [list(torch.split(rows_of[r], sizes_sent[r])) for r in range(world)]
        return [torch.cat([chunks[s][r] for s in range(world)]) for r in range(world)]

    received = exchange([x[r * b:(r + 1) * b][plans[r][0]] for r in range(world)], [p[1] for p in plans])
    shuffled = []
    for r, (_, _, recv_order, recv_counts) in enumerate(plans):
        assert len(received[r]) == b == sum(recv_counts)  # every worker encodes b rows
        out = torch.empty_like(received[r])
        out[recv_order] = received[r]
        assert torch.equal(out, x[perm[r * b:(r + 1) * b]])
        shuffled.append(out)
    back = exchange([shuffled[r][plans[r][2]] for r in range(world)], [p[3] for p in plans])
    for r, (send_order, _, _, _) in enumerate(plans):
        home = torch.empty_like(back[r])
        home[send_order] = back[r]
        assert torch.equal(home, x[r * b:(r + 1) * b])

def test_distributed_rank_state_restores(two_workers):
    fresh = tiny()
    assert fresh.load_rank_state_dict(two_workers[1]["rank_state"])
    for name, value in two_workers[0]["queue"].items():
        assert torch.equal(fresh.queue.state_dict()[name], value), name


@pytest.mark.parametrize("method", ["mls", "moco"])
def test_the_paper_preset_gives_moco_v2s_two_views_not_swavs_multi_crop(method):
    # The data defaults are SwAV's 2x224 + 6x96; MLS/MoCo train on the first two crops only, so
    # their paper preset cuts just those, with MoCo-v2's augmentation.
    from rayssl.presets import layered_config

    d = layered_config({"run": {"method": method}}, preset="paper").data
    assert (list(d.crop_sizes), list(d.crop_counts), list(d.min_scale), list(d.max_scale)) == ([224], [2], [0.2], [1.0])
    assert (d.color_jitter, d.color_jitter_p, d.grayscale_p, d.blur_p) == (0.4, 0.8, 0.2, 0.5)
