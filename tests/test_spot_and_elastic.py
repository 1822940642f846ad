"""Several nodes (issues 6 and 25): one simulated cluster (``ray.cluster_utils.Cluster`` on
loopback), grown node by node, runs ``python -m rayssl.train`` three times:

* elastic: ``--num-workers 1-2`` on the head alone, for 3 epochs; a node joins after the first
  epoch's checkpoint and the run grows to 2 workers (Ray Train resizes from the latest
  checkpoint), finishing with the global batch and the step count it was given;
* a node-local ``--output`` on 3 nodes is refused before training;
* 2 workers on 2 nodes (2 CPUs each on 3-CPU nodes: they cannot share one), checkpointing into
  a path every node sees with every rank's own file, and drained: after the first step a node
  hosting a worker is drained as a spot
  reclaim drains it (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``, a deadline). The
  workers learn it from ``ray.train.get_preemption_info()``, write a just-in-time checkpoint
  inside the epoch and go on; at the deadline Ray Train restarts them on the nodes left from
  that checkpoint, on the preemption budget (``--max-preemptions``), not ``--max-failures`` (0
  here). The run finishes with ``preemptions >= 1`` and ``restarts == 0``, and with
  ``data.deterministic`` the steps trained twice (by the first workers after the checkpoint,
  before the deadline, and again after the restart) give the same losses. (That a run resumed
  inside an epoch ends in the uninterrupted run's very state is tested on one node, in
  tests/test_resume_equivalence.py: a second full run here would cost the suite a minute.)

The cluster runs in a subprocess with its own temp dir and is always stopped (see
tests/test_cluster.py). Its simulated nodes share this machine's cores, so it runs with
``OMP_NUM_THREADS=1``: Ray would give each worker of 2 CPUs 2 torch threads, 4 on 2 cores, and
the steps ran 4-5 times slower (2026-12-06: the fixture took 192 s, 100 s with one thread). (Resuming with ``--resume`` is the same code on one node or several;
the single-node tests cover it.)
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import tiny_args
from rayssl.checkpoint import MANIFEST_FILE, load_rank_state, load_shared_state, verify_checkpoint_dir
from test_cluster import RAY_CLI, run_cluster_session

# The elastic run: 128 scenes (4 steps an epoch at the global batch 32) for 3 epochs; a node joins
# after the first, and the resize check (every 2 s) sees it well before the end of the third.
ELASTIC_EPOCHS, ELASTIC_STEPS = 3, 128 // 32
# The drained run: 256 scenes, 8 steps an epoch, so that on a fast day as on a slow one the drain
# (after step 1) is noticed inside epoch 1 and its deadline comes before the run's last step.
EPOCHS, IMAGES = 2, 256
STEPS_PER_EPOCH = IMAGES // 32
DEADLINE_S = 8  # the drain's deadline at least; see drain_deadline


def _run_args(out: Path, backbone: tuple[str, ...]) -> list[str]:
    return tiny_args(out, "--epochs", str(EPOCHS), "--checkpoint-every", str(EPOCHS), "--keep-checkpoints", "8",
                     "--cpus-per-worker", "2", "--shared-output", "--set", "data.deterministic=true",
                     "--set", "run.preemption_check_every_steps=1", "--set", "run.log_every_steps=1",
                     "--max-failures", "0", "--set", f"data.scenes_num_images={IMAGES}", backbone=backbone)


def drain_deadline(elastic_log: str) -> tuple[int, float | None]:
    """(seconds from the drain to its deadline, the step time read): at least ``DEADLINE_S``, and
    3 steps + 2 s at the step time of the elastic run's last epoch (the same 2 workers of 16
    images, backbone and threads): the workers notice the drain at the end of the next step,
    write the just-in-time checkpoint, and take at least one step more before the deadline. A fixed 8 s left them no
    step after the checkpoint on the AMD CPU at 4.4 s a step (CI of 246e24c, 2026-12-06); the
    run's 15 steps after the drain still outlast the deadline."""
    m = re.search(rf"epoch {ELASTIC_EPOCHS} done: \d+ steps, loss \S+, ([\d.]+) img/s", elastic_log)
    if m is None or float(m.group(1)) <= 0:
        return DEADLINE_S, None
    step_s = 32 / float(m.group(1))  # the global batch
    return max(DEADLINE_S, math.ceil(3 * step_s + 2)), round(step_s, 2)


def _worker_nodes() -> set[str]:
    """The nodes the run's training workers are on (Ray's actor table, read in the test only)."""
    from ray._private.state import state

    return {a["Address"]["NodeID"] for a in state.actor_table(None).values()
            if a.get("ActorClassName", "").endswith("RayTrainWorker") and a.get("State") == "ALIVE"}


def _session(root: str, *backbone: str) -> None:
    """Runs in a subprocess: the cluster and the three runs (the racing ones on ``backbone``, the
    ``race_backbone`` fixture's); each run's result in ROOT/NAME.json, its whole log in
    ROOT/NAME.stderr.txt."""
    import contextlib
    import io

    from ray.cluster_utils import Cluster

    from rayssl.cli import train

    base = Path(root)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # as under `ray job submit`
    others: list = []

    def run(name: str, args: list[str], when=None, then=None) -> None:
        """``train.main(args)`` in a thread; once ``when(log)`` holds, ``then()``."""
        out, log = {}, io.StringIO()

        def main():
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(log):
                try:
                    out["rc"] = train.main(args)
                except SystemExit as exc:  # argparse's error exit
                    out["rc"] = exc.code
            out["stdout"] = stdout.getvalue()

        t = threading.Thread(target=main)
        t.start()
        while when is not None and t.is_alive():
            if when(log.getvalue()):
                out["then"] = then()
                break
            time.sleep(0.1)
        t.join(timeout=400)
        (base / f"{name}.stderr.txt").write_text(log.getvalue())
        (base / f"{name}.json").write_text(json.dumps(out))

    def join():
        others.append(cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1"))
        return time.time()

    def join_and_refresh():
        """A node joins, and Ray's view of the cluster behind Ray Train's resize check is refreshed
        now rather than at its next 20 s tick (Ray Data's AutoscalingCoordinator, an internal
        actor; read in the test only), so the check sees the node within its own 2 s: an 8-step
        run at bf16's speed ended before the tick came (CI, 2026-12-05)."""
        import ray

        then = join()
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.get_reserved_resources.remote("rayssl-test", recompute=True), timeout=30)
        return then

    def drain():
        """A non-head node hosting a worker, with a deadline (``drain_deadline``) that leaves the
        workers the next step to notice it and checkpoint and a step after that, and the run steps
        to go after it."""
        node = sorted(_worker_nodes() & {n.node_id for n in others})[0]
        deadline, step_s = drain_deadline((base / "elastic.stderr.txt").read_text())
        subprocess.run([RAY_CLI, "drain-node", "--address", cluster.address, "--node-id", node,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
                        "--deadline-remaining-seconds", str(deadline)], check=True, capture_output=True)
        return {"node": node, "deadline_s": deadline, "step_s": step_s}

    first_step = f"epoch 1/{EPOCHS} step 1/{STEPS_PER_EPOCH}"
    try:
        run("elastic", tiny_args(base / "elastic", "--num-workers", "1-2", "--epochs", str(ELASTIC_EPOCHS),
                                 "--checkpoint-every", "1", "--cpus-per-worker", "2", "--shared-output",
                                 "--set", "run.elastic_check_s=2", "--set", "run.log_every_steps=1", backbone=backbone),
            when=lambda log: "epoch 1 done" in log, then=join_and_refresh)
        join()
        cluster.wait_for_nodes()
        run("refused", tiny_args(base / "local-run", "--cpus-per-worker", "2", "--epochs", "1"))
        run("preempted", _run_args(base / "preempted", backbone), when=lambda log: first_step in log, then=drain)
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def runs(race_backbone, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cluster")
    proc = run_cluster_session("test_spot_and_elastic", "_session", root, *race_backbone,
                               RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5", OMP_NUM_THREADS="1")
    out = {"root": root}
    for name in ("elastic", "refused", "preempted"):
        path = root / f"{name}.json"
        assert path.is_file(), (proc.stdout + proc.stderr)[-4000:]
        out[name] = {**json.loads(path.read_text()), "log": (root / f"{name}.stderr.txt").read_text()}
    return out


def _summary(run: dict) -> dict:
    assert run.get("rc") == 0, run["log"][-4000:]
    return json.loads(run["stdout"].strip().splitlines()[-1])


def test_an_elastic_run_grows_onto_a_new_node_and_keeps_its_global_batch(runs):
    r = runs["elastic"]
    s = _summary(r)
    assert r.get("then"), "the node joined only after the run"
    assert "1 workers (1-2 allowed): 32 images each per step, global batch 32" in r["log"]
    assert "2 workers (1-2 allowed): 16 images each per step, global batch 32" in r["log"]
    assert "resumed from checkpoint at epoch" in r["log"]
    assert s["workers"] == 2 and s["resizes"] >= 1 and s["restarts"] == 0 and s["preemptions"] == 0
    # The steps and images of its epochs at the global batch given, whatever the worker count.
    assert s["epochs"] == ELASTIC_EPOCHS and s["steps"] == ELASTIC_EPOCHS * ELASTIC_STEPS
    assert s["images_seen"] == ELASTIC_EPOCHS * 128
    assert load_shared_state(Path(s["checkpoint"]))["world_size"] == 2


def test_a_node_local_output_is_refused_on_several_nodes(runs):
    refused, local = runs["refused"], runs["root"] / "local-run"
    assert refused["rc"] == 2
    assert "--output (run.output)" in refused["log"] and "3 nodes" in refused["log"]
    assert "s3://" in refused["log"] and "--shared-output" in refused["log"]
    assert not (local / "config.yaml").exists()


def test_two_workers_on_two_nodes_checkpoint_into_a_path_both_see(runs):
    s = _summary(runs["preempted"])
    assert s["epochs"] == EPOCHS and s["steps"] == EPOCHS * STEPS_PER_EPOCH
    ckpt = Path(s["checkpoint"])
    assert ckpt.parent == runs["root"] / "preempted" and verify_checkpoint_dir(ckpt)["world_size"] == 2
    assert all(load_rank_state(ckpt, rank) is not None for rank in (0, 1))  # each worker's own file
    assert load_shared_state(ckpt)["step"] == s["steps"]


def _step_losses(log: str) -> list[tuple[int, int, str]]:
    return [(int(e), int(k), loss) for e, k, loss in re.findall(r"epoch (\d+)/\d+ step (\d+)/\d+ loss=(\S+)", log)]


def test_a_drained_node_costs_a_just_in_time_checkpoint_not_the_run(runs):
    r = runs["preempted"]
    s = _summary(r)
    assert r.get("then"), "no node was drained"
    assert r["then"]["step_s"], "the deadline did not read the step time from the elastic run's log"
    # The run finished every epoch, after one preemption and no failure.
    assert s["epochs"] == EPOCHS and s["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert s["preemptions"] >= 1 and s["restarts"] == 0, r["log"][-4000:]
    assert "about to be preempted: just-in-time checkpoint at step" in r["log"]
    # The just-in-time checkpoint, written inside epoch 1, is the one the restart continued from.
    run_dir = runs["root"] / "preempted"
    jit = [load_shared_state(d) for d in run_dir.glob("checkpoint_*") if (d / MANIFEST_FILE).exists()
           and load_shared_state(d)["reason"] == "preemption"]
    assert len(jit) == 1, "no just-in-time checkpoint"
    state = jit[0]
    assert state["epoch"] == 0 and 1 < state["step"] == state["epoch_step"] < STEPS_PER_EPOCH
    n = state["step"]
    assert f"resumed from checkpoint at epoch 0, step {n} ({n} step{'' if n == 1 else 's'} into epoch 1)" in r["log"]
    # With data.deterministic, the steps after the checkpoint that the first workers took before
    # the deadline were taken again after the restart, with the same losses, and no step twice
    # with different ones: the restart continued from the very state and data position.
    steps = _step_losses(r["log"])
    again = {x for x in steps if steps.count(x) == 2}
    assert again and all((e, k) > (1, n) for e, k, _ in again), steps  # after the checkpoint, in any epoch
    assert len({(e, k) for e, k, _ in steps}) == len(set(steps)) == EPOCHS * STEPS_PER_EPOCH, steps

