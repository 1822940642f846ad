"""When a worker checkpoints (issue 25): every N steps inside an epoch, at epoch ends, and just in
time after a preemption notice -- once per newly preempted node, also when the notice comes at
an epoch's last step. Ray Train's ``get_preemption_info`` is replaced by a script of what Ray
would say at each step; the runs that really drain a node are in tests/test_spot_and_elastic.py, the
resume from a step checkpoint in tests/test_resume_equivalence.py."""

from __future__ import annotations

from types import SimpleNamespace

import ray.train

from rayssl.runtime import worker

STEPS_PER_EPOCH, EPOCHS = 5, 3


def _walk(monkeypatch, notices: dict[int, dict[str, list[int]]], ask_every: int = 2) -> tuple[dict, list, int]:
    """Train EPOCHS x STEPS_PER_EPOCH steps; ``notices``: from which step on Ray reports which
    preempted nodes. Returns {step or "end N": reason}, the steps at which Ray was asked, and
    how many notices reached the counter."""
    run = SimpleNamespace(preemption_check_every_steps=ask_every, checkpoint_every_steps=3, epochs=EPOCHS,
                          checkpoint_every_epochs=2, checkpoint_upload="async")
    e = SimpleNamespace(cfg=SimpleNamespace(run=run), step=0, epoch=0, epoch_step=0,
                        steps_per_epoch=STEPS_PER_EPOCH, rank=1)
    asked: list[int] = []

    def preemption_info():
        asked.append(e.step)
        since = [s for s in notices if s <= e.step]
        return ray.train.PreemptionInfo(deadline_ms=None, preempted_node_to_ranks=notices[max(since)]) \
            if since else None

    monkeypatch.setattr(ray.train, "get_preemption_info", preemption_info)
    counted = []
    c = worker.Checkpoints(e, monitor=None, on_notice=lambda: counted.append(e.step))
    reasons: dict = {}
    for epoch in range(EPOCHS):
        e.epoch, e.epoch_step = epoch, 0
        for _ in range(STEPS_PER_EPOCH):
            e.step += 1
            e.epoch_step += 1
            reasons[e.step] = c.after_step()
        reasons[f"end {epoch + 1}"] = c.at_epoch_end()
    return {k: v for k, v in reasons.items() if v}, asked, len(counted)


def test_steps_epochs_and_preemption_notices_decide_the_checkpoints(monkeypatch):
    # Node A is reclaimed from step 4 on (noticed at the next check), node B too from step 10:
    # step 10 is epoch 2's last, so its just-in-time checkpoint is the epoch's own.
    reasons, asked, notices = _walk(monkeypatch, {4: {"A": [1]}, 10: {"A": [1], "B": [0]}})
    assert asked == list(range(2, STEPS_PER_EPOCH * EPOCHS + 1, 2))  # the same steps on every rank
    assert reasons == {
        3: "steps", 4: "preemption", 6: "steps", 9: "steps",  # never at an epoch's last step (5, 15)
        "end 2": "preemption", 12: "steps",
        "end 3": "epoch",  # the last epoch; epoch 1 is not checkpointed (every 2 epochs)
    }
    assert notices == 2


def test_nothing_is_asked_when_preemption_checks_are_off(monkeypatch):
    reasons, asked, notices = _walk(monkeypatch, {1: {"A": [0]}}, ask_every=0)
    assert asked == [] and notices == 0
    assert reasons == {3: "steps", 6: "steps", 9: "steps", 12: "steps", "end 2": "epoch", "end 3": "epoch"}
