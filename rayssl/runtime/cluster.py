"""Starting or joining Ray, what the cluster can hold, and the one placement rule.

``ray_session()`` is how every command gets a Ray: an already connected one is used as it is;
with ``RAY_ADDRESS`` set (as under ``ray job submit``) the driver joins that cluster; otherwise
a local Ray is started on loopback, sized to this machine, and stopped again when the session
ends. ``place()`` is the rule every job sizes its units of work by (training workers,
inference actors, sweep trials): a GPU each when asked for or when the cluster has GPUs, and a
share of the CPUs that leaves Ray Data's tasks at least one whole CPU -- on a small machine a
worker holding a whole CPU would leave the pipeline none, and it would wait forever.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import ray

from rayssl.runtime.internals import autoscaler_capacity, local_environment, local_init_options
from rayssl.sections import ConfigError
from rayssl.storage import is_remote

__all__ = ["Placement", "capacity", "check_output_shared", "cpu_share", "place", "ray_session"]


@contextmanager
def ray_session(*, dashboard: bool = True, log_to_driver: bool = True) -> Iterator[None]:
    """Use the connected Ray, join ``RAY_ADDRESS``, or start a local one (stopped on exit).

    ``dashboard``: a local Ray's dashboard process (Ray Train's placement-group cleaner
    queries its state API); a one-off job such as writing shards does without it.
    """
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=log_to_driver)  # joins the cluster named by RAY_ADDRESS
        else:
            with local_environment():  # the local Ray's processes take it when they start
                ray.init(num_cpus=os.cpu_count() or 1, log_to_driver=log_to_driver, include_dashboard=dashboard,
                         **local_init_options())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if started:
        _STARTS.append(time.perf_counter() - t0)
    try:
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


_STARTS: list[float] = []  # seconds each ray_session took to start (or join) Ray, in this process


def ray_start_seconds() -> float | None:
    """How long the last ``ray_session`` of this process took to start or join Ray (None: none did)."""
    return _STARTS[-1] if _STARTS else None


def capacity() -> tuple[dict, int]:
    """``(resources, nodes)`` that the connected cluster has now or can autoscale to.

    On a ``ray up`` cluster whose GPU workers scale from zero (cluster/aws.yaml), a job
    starts on the head alone: its GPUs and extra nodes exist only in the autoscaler's
    config. Local Ray (no autoscaler) gives what it has.
    """
    resources = dict(ray.cluster_resources())
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    most = autoscaler_capacity()
    if most is not None:
        for key, value in most[0].items():
            resources[key] = max(float(resources.get(key, 0)), float(value))
        nodes = max(nodes, most[1])
    return resources, nodes


def cpu_share(cpus: float, units: int, reserved: float = 1.0, low: float = 0.1, high: float = 1.0) -> float:
    """CPUs per unit of work when ``units`` share ``cpus`` after ``reserved`` (Ray Data's CPU).

    Rounded down to a hundredth, so the units never take more than what is left.
    """
    return max(low, min(high, math.floor(100 * (cpus - reserved) / max(1, units)) / 100))


@dataclass(frozen=True)
class Placement:
    """How one unit of work is placed: on a GPU or not, and the CPUs it reserves."""

    use_gpu: bool
    cpus: float

    def resources(self) -> dict:
        return {"CPU": self.cpus, **({"GPU": 1} if self.use_gpu else {})}


def place(cluster: dict, units: int, use_gpu: bool | None = None, cpus: float | None = None, *,
          flag: str = "--use-gpu", reserved: float = 1.0, low: float = 0.1, high: float = 1.0) -> Placement:
    """The placement of ``units`` units of work on a cluster of ``cluster`` resources.

    ``use_gpu``: None = when the cluster has a GPU; True with no GPU is refused, naming ``flag``.
    ``cpus``: the user's own CPUs per unit, else ``cpu_share`` of the cluster's CPUs.
    """
    gpus = float(cluster.get("GPU", 0))
    gpu = use_gpu if use_gpu is not None else gpus >= 1
    if gpu and gpus < 1:
        raise ConfigError(f"{flag}: true, but the Ray cluster has no GPU")
    if cpus is None:
        cpus = cpu_share(float(cluster.get("CPU", 1)), units, reserved, low, high)
    return Placement(gpu, cpus)


def check_output_shared(output: str, shared_output: bool, num_nodes: int) -> None:
    """Refuse a node-local ``--output`` when the training workers may sit on several machines.

    Ray Train persists each worker's checkpoint files from the worker's own node: with a plain
    local path, the files of workers on other nodes land on those nodes' disks, and neither the
    summary nor ``--resume`` can find a complete checkpoint afterwards.
    """
    if num_nodes > 1 and not is_remote(output) and not shared_output:
        raise ConfigError(
            f"run.output: {output} is a local path, but the Ray cluster has (or can scale to) "
            f"{num_nodes if num_nodes < sys.maxsize else 'any number of'} nodes: workers "
            "on other nodes would write their checkpoint files to their own disks, where neither the summary "
            "nor --resume can find them. Use storage every node reaches (--output s3://bucket/prefix), or pass "
            "--shared-output if this path is a shared filesystem mounted at the same place on every node"
        )
