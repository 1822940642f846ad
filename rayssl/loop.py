"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on every worker.

Ray enters here only through ``ray.train`` (context, dataset shard, report, checkpoint);
the model, loss and optimiser step are the pure-PyTorch method modules.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from rayssl.checkpoint import (
    CheckpointError,
    gather_rank_sizes,
    load_rank_state,
    load_shared_state,
    rng_state,
    set_rng_state,
    write_rank_state,
    write_shared_state,
)
from rayssl.config import Config
from rayssl.losses import loss_at_uniform
from rayssl.eval.features import evaluate_on_scenes, scenes_eval_sets, to_float_images
from rayssl.datawait import DataWait
from rayssl.lockstep import control_group, lockstep
from rayssl.methods import get_method
from rayssl.optim import LARS, param_groups_for_lars, scaled_lr, warmup_cosine


def log(msg: str) -> None:
    # Not print(): Ray Train patches print() in workers and would emit the line twice.
    sys.stderr.write(f"[rayssl] {msg}\n")
    sys.stderr.flush()


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "lars":
        if o.lars_exclude_bias_norm:
            groups = param_groups_for_lars(model, o.weight_decay)
        else:
            groups = [{"params": list(model.parameters()), "weight_decay": o.weight_decay}]
        return LARS(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay,
                    trust_coefficient=o.lars_eta)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=o.weight_decay, foreach=True)
    return torch.optim.SGD(model.parameters(), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay,
                           foreach=True)


class Schedule:
    """Warmup + cosine over the whole run, in steps."""

    def __init__(self, cfg: Config, steps_per_epoch: int):
        self.total = max(1, cfg.run.epochs * steps_per_epoch)
        self.warmup = min(self.total, int(round(cfg.optim.warmup_epochs * steps_per_epoch)))
        self.base = scaled_lr(cfg.optim.base_lr, cfg.run.batch_size)
        self.final = self.base * cfg.optim.final_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total, self.warmup, self.base, self.final)


class CollapseWatch:
    """Warns once when the SwAV-style loss stays at ln(K) for several log windows."""

    def __init__(self, num_prototypes: int | None, windows: int = 3, rel_tol: float = 0.01):
        self.num_prototypes, self.windows, self.tol = num_prototypes, windows, rel_tol
        self.uniform = math.log(num_prototypes) if num_prototypes else None
        self.count, self.warned = 0, False

    def update(self, loss: float, step: int) -> str | None:
        if self.uniform is None:
            return None
        self.count = self.count + 1 if loss_at_uniform(loss, self.num_prototypes, self.tol) else 0
        if self.count >= self.windows and not self.warned:
            self.warned = True
            return (
                f"step {step}: loss {loss:.4f} has stayed at ln(K) = {self.uniform:.4f} for {self.count} "
                "log windows: predictions are uniform over prototypes (SwAV collapse). Usual causes: "
                "queue switched on too early, learning rate too high, too few prototypes used, or "
                "prototypes still frozen."
            )
        return None


def checked_forward(model, crops, *, epoch: int, step: int, method_name: str, autocast=nullcontext,
                    check_loss: bool = True, extra: dict | None = None):
    """One forward pass -> ``(loss, metrics)``; a non-finite quantity stops the step.

    Non-finite Sinkhorn codes (the methods raise ValueError "... not finite ...") and, when
    ``check_loss`` (every step on CPU; on GPU only at log steps, to avoid a sync per step),
    a non-finite loss become FloatingPointError naming the step, the epoch and the quantity.
    """
    try:
        with autocast():
            # ``extra``: the batch columns a method asks for in ``batch_columns`` (CDUL: "index").
            loss, metrics = model(crops, epoch=epoch, step=step, **(extra or {}))
    except ValueError as exc:
        if "not finite" not in str(exc):
            raise
        raise FloatingPointError(f"step {step} (epoch {epoch}): {exc}") from None
    if check_loss and not torch.isfinite(loss).item():
        raise FloatingPointError(
            f"step {step} (epoch {epoch}): the {method_name} loss is not finite ({loss.item()}); "
            "lower optim.base_lr or check the input data"
        )
    return loss, metrics


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def train_loop_per_worker(payload: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(payload["config"])
    steps_per_epoch: int = payload["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    local_batch = cfg.run.batch_size // world
    spec = get_method(cfg.run.method)

    torch.manual_seed(cfg.run.seed)  # identical init on every rank (DDP also broadcasts)
    method = spec.model_cls(cfg.method, cfg.model, num_crops=sum(cfg.data.crop_counts), world_size=world)
    if cfg.model.sync_batchnorm and world > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method.to(device)
    channels_last = cfg.run.channels_last and device.type == "cuda"
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        # In place (Module.compile): parameter names, checkpoints and exports stay unchanged.
        method.backbone.compile()
    optimizer = build_optimizer(method, cfg)
    schedule = Schedule(cfg, steps_per_epoch)

    start_epoch, step, images_seen = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            try:
                shared = load_shared_state(d, map_location=device)
            except CheckpointError as exc:
                raise CheckpointError(f"cannot resume: {exc}") from None
            method.load_state_dict(shared["model"])
            optimizer.load_state_dict(shared["optimizer"])
            start_epoch, step, images_seen = shared["epoch"], shared["step"], shared["images_seen"]
            mine = load_rank_state(d, rank, map_location=device)
            restored = mine is not None and method.load_rank_state_dict(mine["method"])
            if "method_state" in shared:  # state shared by all ranks (CDUL's label store)
                method.load_shared_state_dict(shared["method_state"])
            if mine is not None and shared.get("world_size") == world:
                set_rng_state(mine["rng"])
        if rank == 0:
            log(f"resumed from checkpoint at epoch {start_epoch}, step {step}"
                + ("" if restored else " (per-worker state such as queues restarted empty)"))
    else:
        torch.manual_seed(cfg.run.seed * 1000 + rank + 1)  # per-rank randomness from here on

    model: torch.nn.Module = method
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device] if device.type == "cuda" else None
        )
    use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    # "For long": two epochs' worth of log windows (at least 3) with the loss at ln(K).
    watch = CollapseWatch(getattr(cfg.method, "num_prototypes", None),
                          windows=max(3, 2 * steps_per_epoch // cfg.run.log_every_steps))
    eval_sets = None
    random_init_score = None
    metric = spec.metric
    shard = ray.train.get_dataset_shard("train")
    stats = payload.get("stats")
    if stats is not None and rank == 0:
        stats.add.remote({"train.worker_group_starts": 1})  # restarts = starts - 1
    crop_keys = [f"crop_{j}" for j in range(sum(cfg.data.crop_counts))]
    control = control_group()  # host-side (gloo) group for the per-step "have data" flags
    device_augment = None
    if cfg.data.augment_on == "device":
        from rayssl.data.gpu_augment import DeviceMultiCrop
        from rayssl.data.multicrop import crop_spec

        device_augment = DeviceMultiCrop(crop_spec(cfg), device, channels_last=channels_last)
    last_loss = float("nan")
    waits = DataWait()  # time blocked on the next batch: is the input pipeline keeping up?

    for epoch in range(start_epoch, cfg.run.epochs):
        if stats is not None and rank == 0:
            # Before asking for the epoch's data: its augmentations are seeded by the epoch.
            ray.get(stats.set_epoch.remote(epoch))
        t0 = time.perf_counter()
        epoch_steps, epoch_images = 0, 0
        win_loss, win_n, win_t = torch.zeros((), device=device), 0, time.perf_counter()
        waits.take_window()
        shuffle = {"local_shuffle_buffer_size": cfg.data.shuffle_buffer or None,
                   "local_shuffle_seed": (cfg.run.seed * 100003 + epoch * 101 + rank) if cfg.data.shuffle_buffer
                   else None}
        if device_augment is not None:  # data.augment_on=device: decode + multi-crop here
            from rayssl.data.gpu_augment import device_crop_batches

            source = device_crop_batches(
                shard.iter_batches(batch_size=local_batch, drop_last=True, batch_format="numpy", **shuffle),
                device_augment, seed=cfg.run.seed, epoch=epoch, min_side=1)
        else:
            source = shard.iter_torch_batches(batch_size=local_batch, drop_last=True, device=device, **shuffle)
        # Every rank must take the same number of steps (collectives inside the step): all
        # stop as soon as one runs out of data, decided on the host one step ahead (no
        # device sync per step; see rayssl.lockstep).
        for batch in waits.wrap(lockstep(source, control, limit=steps_per_epoch)):
            crops = batch.pop("crops", None) or [to_float_images(batch[k], channels_last=channels_last)
                                                 for k in crop_keys]
            lr = schedule(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, metrics = checked_forward(
                model, crops, epoch=epoch, step=step, method_name=cfg.run.method, autocast=autocast,
                check_loss=device.type == "cpu" or step % cfg.run.log_every_steps == 0,
                extra={k: batch[k] for k in getattr(method, "batch_columns", ())},
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(step)
            optimizer.step()
            step += 1
            epoch_steps += 1
            epoch_images += local_batch * world
            win_loss += metrics["loss"]
            if epoch_steps == 1:  # the epoch's first loss: after a resume, the step right after the checkpoint
                first_loss = metrics["loss"].detach()
            win_n += 1
            if rank == 0 and step % cfg.run.log_every_steps == 0:
                mean_loss = (win_loss / win_n).item()
                win_s = time.perf_counter() - win_t
                ips = win_n * local_batch * world / win_s
                wait_pct = 100.0 * waits.take_window() / win_s
                extra = ""
                if "prototypes_used_in_batch" in metrics:
                    extra = f" protos_used={int(metrics['prototypes_used_in_batch'].item())}"
                if stats is not None:
                    extra += _skip_text(stats)
                log(f"epoch {epoch + 1}/{cfg.run.epochs} step {epoch_steps}/{steps_per_epoch} "
                    f"loss={mean_loss:.4f} lr={lr:.4g} {ips:.1f} img/s data_wait={wait_pct:.0f}%{extra}")
                warn = watch.update(mean_loss, step)
                if warn:
                    log("WARNING " + warn)
                win_loss.zero_()
                win_n, win_t = 0, time.perf_counter()
        if epoch_steps == 0:
            raise RuntimeError(
                f"epoch {epoch}: no batch reached the workers (global batch {cfg.run.batch_size} may exceed the "
                "usable images, or every image was skipped)"
            )
        last_loss = float(metrics["loss"].item())
        images_seen += epoch_images
        elapsed = time.perf_counter() - t0

        is_last = epoch + 1 == cfg.run.epochs
        report = {
            "epoch": epoch + 1,
            "step": step,
            "loss": last_loss,
            "first_loss": float(first_loss.item()),
            "images_seen": images_seen,
            "images_per_s": epoch_images / elapsed,
            "lr": lr,
            # Of the epoch's wall time: blocked on the next batch, and of that the first one.
            "data_wait_s": waits.epoch_s,
            "first_batch_s": waits.first_batch_s,
        }
        do_eval = is_last or (cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0)
        if do_eval and cfg.eval.num_test_images > 0 and rank == 0:
            te = time.perf_counter()
            if eval_sets is None:
                eval_sets = scenes_eval_sets(cfg.run.seed, cfg.data.scenes_image_size,
                                             cfg.eval.num_train_images, cfg.eval.num_test_images)
            size = cfg.data.crop_sizes[0]
            if hasattr(method, "evaluate_held_out"):  # a classifier scores itself (CDUL)
                report[metric] = method.evaluate_held_out(eval_sets, size, device)
            else:
                report[metric] = evaluate_on_scenes(metric, method.backbone, eval_sets, size, device,
                                                    cfg.eval.knn_k, cfg.eval.knn_temperature)
            if cfg.eval.random_baseline and random_init_score is None and not hasattr(method, "evaluate_held_out"):
                random_init_score = _random_init_score(cfg, metric, eval_sets, size, device)
            if random_init_score is not None:
                report[f"{metric}_random_init"] = random_init_score
            log(f"epoch {epoch + 1}: {metric} on held-out scenes {report[metric]:.4f}"
                + (f" (random init: {random_init_score:.4f})" if random_init_score is not None else "")
                + f" [{time.perf_counter() - te:.1f}s]")
        if stats is not None and rank == 0:
            report["data"] = _stats(stats)

        save = is_last or (epoch + 1) % cfg.run.checkpoint_every_epochs == 0
        if save:
            with tempfile.TemporaryDirectory(prefix="rayssl-ckpt-") as tmp:
                size = write_rank_state(tmp, rank, {"method": method.rank_state_dict(), "rng": rng_state()})
                rank_sizes = gather_rank_sizes(size, device)  # collective: the manifest records every rank's file
                if rank == 0:
                    write_shared_state(tmp, {
                        "method": cfg.run.method,
                        "model": method.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "step": step,
                        "images_seen": images_seen,
                        "world_size": world,
                        "config": cfg.to_dict(),
                        **({"method_state": method.shared_state_dict()}
                           if hasattr(method, "shared_state_dict") else {}),
                    }, world_size=world, rank_sizes=rank_sizes)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(report)
        if rank == 0:
            log(f"epoch {epoch + 1} done: {epoch_steps} steps, loss {last_loss:.4f}, "
                f"{report['images_per_s']:.1f} img/s, {waits.epoch_s:.1f} of {elapsed:.1f} s waiting for data "
                f"(first batch {waits.first_batch_s:.1f} s)" + (", checkpoint saved" if save else ""))


def _random_init_score(cfg: Config, metric: str, eval_sets, size: int, device) -> float:
    """The same metric for a randomly initialised backbone of the same architecture."""
    from rayssl.modules.backbone import build_backbone

    with torch.random.fork_rng(devices=[]):  # leave the training RNG stream untouched
        torch.manual_seed(cfg.run.seed)
        net, _ = build_backbone(cfg.model.backbone, small_stem=cfg.model.small_stem)
    net.to(device)
    return evaluate_on_scenes(metric, net, eval_sets, size, device, cfg.eval.knn_k, cfg.eval.knn_temperature)


def _stats(stats) -> dict:
    import ray

    try:
        return ray.get(stats.get.remote(), timeout=10)
    except Exception:  # statistics must never stop training
        return {}


def _skip_text(stats) -> str:
    counts = _stats(stats)
    skipped = sum(v for k, v in counts.items() if k.startswith("skipped."))
    return f" skipped={skipped}/{counts.get('seen', 0)}" if skipped else ""
