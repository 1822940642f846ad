"""Spot preemption and elastic workers (issue 25).

Preemption: a node of a running job is drained as a spot reclaim drains it
(``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` with a deadline). The workers learn
it from ``ray.train.get_preemption_info()``, write a just-in-time checkpoint inside the epoch
and go on; at the deadline Ray Train restarts them on the nodes left, from that checkpoint,
on the preemption budget (``--max-preemptions``), not ``--max-failures`` (0 here). The run
finishes all its epochs with ``preemptions >= 1`` and ``restarts == 0``, and with
``data.deterministic`` in the very state of the same run left alone.

Elastic: a run started with ``--num-workers 1-2`` on a 1-node cluster that gains a node grows to
2 workers (Ray Train resizes from the latest checkpoint) and finishes with the global batch and
the step count it was given.

The clusters (``ray.cluster_utils.Cluster`` on loopback) run in subprocesses with their own temp
dir, and are always stopped (see tests/test_cluster.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import torch

from conftest import tiny_args
from rayssl.checkpoint import MANIFEST_FILE, load_rank_state, load_shared_state
from test_cluster import RAY_CLI, run_cluster_session

EPOCHS, STEPS_PER_EPOCH = 2, 128 // 32


def _run_args(out: Path) -> list[str]:
    return tiny_args(out, "--epochs", str(EPOCHS), "--checkpoint-every", str(EPOCHS), "--keep-checkpoints", "8",
                     "--cpus-per-worker", "2", "--shared-output", "--set", "data.deterministic=true",
                     "--set", "run.preemption_check_every_steps=1", "--set", "run.log_every_steps=1",
                     "--max-failures", "0")


def _worker_nodes() -> set[str]:
    """The nodes the run's training workers are on (Ray's actor table, read in the test only)."""
    from ray._private.state import state

    return {a["Address"]["NodeID"] for a in state.actor_table(None).values()
            if a.get("ActorClassName", "").endswith("RayTrainWorker") and a.get("State") == "ALIVE"}


def _preemption_session(reference: str, preempted: str, report: str) -> None:
    """Runs in a subprocess: a 3-node cluster; the run left alone, then the run drained."""
    import contextlib
    import io

    from ray.cluster_utils import Cluster

    from rayssl.cli import train

    # 3 CPUs per node and 2 per training worker: the two workers take two nodes, each node
    # keeps one CPU for Ray Data, and the third node is where a preempted worker goes.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    others = [cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    out: dict = {"drained": None}

    def main(args, stderr=None):
        stdout, stderr = io.StringIO(), stderr or io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = train.main(args)
        Path(f"{args[1]}.stderr.txt").write_text(stderr.getvalue())  # the whole log, for a failure's reader
        return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()[-6000:]}

    def drain_a_worker_node(log: io.StringIO, result: dict):
        """After the first step, drain a non-head node hosting a worker. The deadline (15 s) leaves
        the workers the next step to notice it and checkpoint, and the run steps to go after it."""
        while "rc" not in result:
            if "epoch 1/2 step 1/4" in log.getvalue():
                node = sorted(_worker_nodes() & {n.node_id for n in others})[0]
                subprocess.run([RAY_CLI, "drain-node", "--address", cluster.address, "--node-id", node,
                                "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
                                "--deadline-remaining-seconds", "15"], check=True, capture_output=True)
                out["drained"] = {"node": node, "at": time.time()}
                return
            time.sleep(0.1)

    try:
        out["reference"] = main(_run_args(Path(reference)))
        result: dict = {}
        log = io.StringIO()
        t = threading.Thread(target=lambda: result.update(main(_run_args(Path(preempted)), log)))
        t.start()
        drain_a_worker_node(log, result)
        t.join(timeout=400)
        out["preempted"] = result
    finally:
        Path(report).write_text(json.dumps(out))
        cluster.shutdown()


def _summary(run: dict) -> dict:
    return json.loads(run["stdout"].strip().splitlines()[-1])


def test_a_drained_node_costs_a_just_in_time_checkpoint_not_the_run(tmp_path):
    reference, preempted, report = tmp_path / "reference", tmp_path / "preempted", tmp_path / "report.json"
    proc = run_cluster_session("test_spot_and_elastic", "_preemption_session", reference, preempted, report,
                               RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5")
    assert report.is_file(), (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(report.read_text())
    assert r["reference"]["rc"] == 0, r["reference"]["stderr"]
    assert r["drained"] is not None, "no worker was on a node that could be drained"
    run = r["preempted"]
    assert run.get("rc") == 0, run.get("stderr")
    s, s_ref = _summary(run), _summary(r["reference"])
    assert _summary(r["reference"])["preemptions"] == 0

    # The run finished every epoch, after one preemption and no failure.
    assert s["epochs"] == EPOCHS and s["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert s["preemptions"] >= 1 and s["restarts"] == 0, run["stderr"]
    log = Path(f"{preempted}.stderr.txt").read_text()
    assert "about to be preempted: just-in-time checkpoint at step" in log
    # The just-in-time checkpoint, written inside epoch 1, is the one the restart continued from.
    jit = [load_shared_state(d) for d in preempted.glob("checkpoint_*") if (d / MANIFEST_FILE).exists()
           and load_shared_state(d)["reason"] == "preemption"]
    assert len(jit) == 1, "no just-in-time checkpoint"
    state = jit[0]
    assert state["epoch"] == 0 and 1 < state["step"] == state["epoch_step"] < STEPS_PER_EPOCH
    n = state["step"]
    assert f"resumed from checkpoint at epoch 0, step {n} ({n} step{'' if n == 1 else 's'} into epoch 1)" in log

    # With data.deterministic, the state at the end is the undisturbed run's.
    a_dir, b_dir = Path(s_ref["checkpoint"]), Path(s["checkpoint"])
    a, b = load_shared_state(a_dir), load_shared_state(b_dir)
    assert a["step"] == b["step"] == EPOCHS * STEPS_PER_EPOCH
    for name, x in a["model"].items():
        assert torch.allclose(x.float(), b["model"][name].float(), rtol=1e-5, atol=1e-6), name
    for rank in (0, 1):
        qa, qb = load_rank_state(a_dir, rank)["rng"], load_rank_state(b_dir, rank)["rng"]
        assert torch.equal(qa["torch"], qb["torch"]), f"rank {rank}'s RNG state"


# --------------------------------------------------------------------------- elastic


def _elastic_session(run: str, report: str) -> None:
    """Runs in a subprocess: one node; a node joins after the run's first step."""
    import contextlib
    import io

    from ray.cluster_utils import Cluster

    from rayssl.cli import train

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    out: dict = {}
    args = tiny_args(run, "--num-workers", "1-2", "--epochs", "3", "--checkpoint-every", "1",
                     "--cpus-per-worker", "2", "--shared-output", "--set", "run.elastic_check_s=2",
                     "--set", "run.log_every_steps=1")
    log = io.StringIO()

    def main():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(log):
            out["rc"] = train.main(args)
        out["stdout"] = stdout.getvalue()

    try:
        t = threading.Thread(target=main)
        t.start()
        while "rc" not in out and "epoch 1/3 step 1/4" not in log.getvalue():
            time.sleep(0.1)
        cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
        out["joined"] = time.time()
        t.join(timeout=400)
    finally:
        Path(f"{run}.stderr.txt").write_text(log.getvalue())
        Path(report).write_text(json.dumps(out))
        cluster.shutdown()


def test_an_elastic_run_grows_onto_a_new_node_and_keeps_its_global_batch(tmp_path):
    run, report = tmp_path / "run", tmp_path / "report.json"
    proc = run_cluster_session("test_spot_and_elastic", "_elastic_session", run, report)
    assert report.is_file(), (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(report.read_text())
    log = Path(f"{run}.stderr.txt").read_text()
    assert r.get("rc") == 0, log[-4000:]
    s = _summary(r)
    assert "1 workers (1-2 allowed): 32 images each per step, global batch 32" in log
    assert "2 workers (1-2 allowed): 16 images each per step, global batch 32" in log
    assert s["workers"] == 2 and s["resizes"] >= 1 and s["restarts"] == 0 and s["preemptions"] == 0
    # The steps and images of 3 epochs at the global batch given, whatever the worker count.
    assert s["epochs"] == 3 and s["steps"] == 3 * STEPS_PER_EPOCH and s["images_seen"] == 3 * 128
    assert load_shared_state(Path(s["checkpoint"]))["world_size"] == 2
