"""rayssl.modules.seeding: a seeded side computation (the random-init baseline, the online probe's
head, the eval job's baseline) leaves the training's random streams as they were."""

from __future__ import annotations

import torch

from rayssl.modules.seeding import cpu_seeded


def test_inside_the_cpu_generator_is_seeded_and_after_it_goes_on_as_before(monkeypatch):
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    torch.manual_seed(7)
    reseeded.clear()
    expected_after = (torch.rand(3), torch.rand(3))[1]  # the stream's second draw
    torch.manual_seed(7)
    reseeded.clear()
    torch.rand(3)
    with cpu_seeded(123):
        inside = torch.rand(4)
    after = torch.rand(3)
    assert torch.equal(inside, torch.rand(4, generator=torch.Generator().manual_seed(123)))
    assert torch.equal(after, expected_after)  # the training stream went on as if nothing happened
    assert reseeded == []  # no GPU generator was reseeded (torch.manual_seed would have)


def test_an_evaluation_inside_untouched_streams_leaves_the_training_stream_where_it_was():
    from rayssl.modules.seeding import untouched_streams

    torch.manual_seed(3)
    torch.rand(2)
    expected = torch.rand(5)
    torch.manual_seed(3)
    torch.rand(2)
    with untouched_streams("cpu"):
        torch.rand(100)  # anything an evaluation draws
        torch.nn.Linear(8, 8)
    assert torch.equal(torch.rand(5), expected)
