"""Shared fixtures. Ray is started once per test session, on loopback, and always stopped."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray instance for the whole session (2 CPUs like the CI machine)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.1",
             log_to_driver=True, include_dashboard=True)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def tiny_args(output, *extra: str) -> list[str]:
    """CLI arguments for a SwAV run that takes a few seconds per epoch on 2 CPU cores."""
    return [
        "--output", str(output), "--num-workers", "2", "--batch-size", "32",
        "--set", "data.scenes_num_images=128", "--set", "eval.num_train_images=100",
        "--set", "eval.num_test_images=50", "--set", "swav.num_prototypes=32",
        "--set", "swav.projection_hidden_dim=64", "--set", "swav.projection_dim=32",
        "--set", "eval.random_baseline=false",
        *extra,
    ]
