"""Shared fixtures. Ray is started once per test session, on loopback, and always stopped."""

from __future__ import annotations

import os

import pytest

from rayssl.bench.gpu_check import TEST_RESNET
from rayssl.runtime.internals import TRAIN_POLL_ENV, local_init_options

# Ray Train's controller polls its workers every 2 s by default (0.5 s in a local Ray rayssl
# starts itself): seconds of every run's start and end. Polling faster shortens each of the
# suite's ~40 runs; set before any Ray starts (every Ray process, and the clusters the tests
# start in subprocesses, inherit it).
os.environ.setdefault(TRAIN_POLL_ENV, "0.25")
# W&B (--wandb) only ever runs offline here, and reports nothing about itself anywhere.
os.environ.update({"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true"})


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray instance for the whole session (2 CPUs like the CI machine)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=max(2, os.cpu_count() or 2), log_to_driver=True, include_dashboard=True,
             **local_init_options())  # on loopback, as a local Ray rayssl starts
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP checkpoint (6 steps on 64 scenes: enough to run the labelling code)."""
    from rayssl.pseudolabel.tiny_clip import train_tiny_clip

    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    train_tiny_clip(str(path), steps=6, seconds=60, batch_size=32, num_scenes=64)
    return str(path)


# timm's 0.4 M-parameter test ResNet (batch norm, as ResNet-18) in place of ResNet-18: for runs
# that test what a run stores, resumes or reads rather than what ResNet-18 learns. Its steps take
# a fortieth of the time on a CPU without AVX-512 (60 ms against 2.4 s at 16 images) and its
# checkpoints 5 MB, not 100.
# The assignments are the GPU check's dry-run backbone (rayssl.bench.gpu_check.TEST_RESNET), for
# the tests that layer --set strings themselves; TEST_BACKBONE is them as command-line pairs.
TEST_BACKBONE_SETS = TEST_RESNET
TEST_BACKBONE = tuple(arg for assignment in TEST_BACKBONE_SETS for arg in ("--set", assignment))
# ResNet-18 with the small-image stem, the default run's backbone: for the runs whose assertions
# race their own steps (a worker killed inside epoch 2, a node that joins or is drained while the
# run trains), which need steps of about a second even on a fast CPU. See ``race_backbone``.
RESNET18 = ("--set", "model.backbone=resnet18", "--set", "model.small_stem=true")
# The quick preset's crops (2 x 32 + 4 x 16 px), and the smaller ones the racing runs take on a
# CPU where ResNet-18's step at them is far over a second (2 x 16 + 4 x 8 px).
RACE_CROPS, SLOW_CPU_RACE_CROPS = (32, 16), (16, 8)
# The step of one worker's 16 images on ResNet-18 at RACE_CROPS above which a CPU takes
# SLOW_CPU_RACE_CROPS (2026-12-06, one thread: 3.8-4.2 s on the 2-core AMD EPYC in fp32, where
# the 2-worker runs stepped in 3.7-5.4 s; 1.75 s there at SLOW_CPU_RACE_CROPS).
SLOW_CPU_STEP_S = 1.6


def race_step_s(crops: tuple[int, int] = RACE_CROPS, batch: int = 8) -> float:
    """Seconds of one worker's SwAV step of 16 images on ResNet-18 (the bench's own step on
    synthetic crops: ``rayssl.bench.step.StepBench``, the quick preset's recipe at ``crops``, in
    the precision a run picks here) on one thread: the mean of 2 steps of ``batch`` images
    after a warm-up, scaled to 16 (about 4 s on the AMD EPYC)."""
    import statistics
    import time

    import torch

    from rayssl.bench.config import bench_config
    from rayssl.bench.step import StepBench

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's share of the 2 cores
    try:
        sb = StepBench(bench_config("swav", "cpu", batch, [f"data.crop_sizes=[{crops[0]},{crops[1]}]"]),
                       torch.device("cpu"))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            sb.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) * 16 / batch
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def listings(monkeypatch) -> list[str]:
    """The data URIs listed in this process from here on: a command lists the user's source once
    (a bucket's listing can take minutes), and each part it runs reads that listing."""
    import rayssl.data.pipeline as pipeline

    listed: list[str] = []
    resolve = pipeline.resolve_source

    def counted(uri, *args, **kwargs):
        listed.append(uri)
        return resolve(uri, *args, **kwargs)

    monkeypatch.setattr(pipeline, "resolve_source", counted)
    return listed


@pytest.fixture(scope="session")
def race_backbone() -> tuple[str, ...]:
    """``tiny_args``' backbone for the runs that race their own steps: ResNet-18 (``RESNET18``) at
    the quick preset's crops, or at ``SLOW_CPU_RACE_CROPS`` where its step is over
    ``SLOW_CPU_STEP_S`` here. Their races need steps of about a second; on the AMD EPYC the
    preset's crops made them 3-4 times that, about 2 minutes of the suite."""
    step_s = race_step_s()
    crops = SLOW_CPU_RACE_CROPS if step_s > SLOW_CPU_STEP_S else RACE_CROPS
    print(f"\n[conftest] ResNet-18 step at {RACE_CROPS} px: {step_s:.2f} s -> racing runs crop {crops} px")
    return (*RESNET18, "--set", f"data.crop_sizes=[{crops[0]},{crops[1]}]")


def tiny_args(output, *extra: str, backbone: tuple[str, ...] = TEST_BACKBONE) -> list[str]:
    """CLI arguments for a SwAV run that takes a few seconds per epoch on 2 CPU cores."""
    return [
        "--output", str(output), "--num-workers", "2", "--batch-size", "32",
        "--set", "data.scenes_num_images=128", "--set", "eval.num_train_images=100",
        "--set", "eval.num_test_images=50", "--set", "swav.num_prototypes=32",
        "--set", "swav.projection_hidden_dim=64", "--set", "swav.projection_dim=32",
        "--set", "eval.random_baseline=false", *backbone,
        *extra,
    ]


def image_bytes(seed: int, size: int = 32, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """An encoded image of seeded random pixels (``mode`` RGB or L), a different one per seed."""
    import io

    import numpy as np
    from PIL import Image

    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


def make_tar(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding ``(name, bytes)`` members, in that order."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_scene_pseudo_labels(out, classes: list[str], soft, rows=None, size: int = 64):
    """A labelling job's output for the training scenes (seed 0) without a CLIP: one Parquet
    file of ``index, path, soft_label`` rows (in the order of ``rows``, default 0..N-1) and
    its ``pseudolabels.json``. Returns ``out``."""
    from pathlib import Path

    from rayssl.data.pseudo_labels import scenes_source, write_soft_labels
    from rayssl.data.scenes import split_seed

    write_soft_labels(str(out), classes, soft, scenes_source(split_seed(0, "train"), size, len(soft)), rows)
    return Path(out)


# ----------------------------------------------------------------------------- secrets


def find_needles(needles: list[bytes], data: bytes) -> list[bytes]:
    return [n for n in needles if n in data]


def scan_tree(root, needles: list[bytes]) -> dict[str, list[bytes]]:
    """Every regular file under root: its bytes, and for *.pt the unpickled objects re-pickled."""
    import pickle
    from pathlib import Path

    import torch

    hits: dict[str, list[bytes]] = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        found = find_needles(needles, data)
        if p.suffix == ".pt":
            obj = torch.load(p, map_location="cpu", weights_only=False)
            found += find_needles(needles, pickle.dumps(obj)) + find_needles(needles, repr(obj).encode())
        if found:
            hits[str(p)] = sorted(set(found))
    return hits


# ----------------------------------------------------------------------------- S3

_AWS_ENV = {
    # Fake credentials: tests must never reach a real account (and never print these).
    "AWS_ACCESS_KEY_ID": "rayssl-test-key",
    "AWS_SECRET_ACCESS_KEY": "rayssl-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups off loopback
    # Anything that forgets its endpoint hits a closed loopback port, never AWS.
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
}
_AWS_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


@pytest.fixture(scope="session", autouse=True)
def aws_test_env(tmp_path_factory):
    """Fake AWS credentials and no profile files for the whole session, restored after.

    Session-wide and autouse so it is in place before Ray starts: Ray's worker processes
    inherit the environment they will read credentials from.
    """
    saved = {k: os.environ.get(k) for k in (*_AWS_ENV, *_AWS_CLEARED, "AWS_CONFIG_FILE",
                                             "AWS_SHARED_CREDENTIALS_FILE")}
    empty = tmp_path_factory.mktemp("aws") / "none"
    os.environ.update(_AWS_ENV)
    os.environ["AWS_CONFIG_FILE"] = str(empty)
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    for k in _AWS_CLEARED:
        os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port) for the session; yields its URL."""
    from faultproxy import moto_on_loopback

    with moto_on_loopback() as url:
        yield url


@pytest.fixture
def fault_proxy(s3_endpoint):
    """A factory of fault-injecting proxies in front of moto (``tests/faultproxy.py``), all
    stopped after the test: ``fault_proxy(plan, stall_s=..., delay_s=...)``."""
    from faultproxy import FaultProxy

    started = []

    def make(plan, stall_s: float = 2.0, budget: int = 10_000, delay_s: float = 0.0):
        proxy = FaultProxy(s3_endpoint, plan, stall_s=stall_s, budget=budget, delay_s=delay_s).start()
        started.append(proxy)
        return proxy
    yield make
    for proxy in started:
        proxy.stop()


def exit_code(main, argv) -> int:
    """A command's exit code, whether it returned it or argparse exited with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code
