"""EMBR-E's energy head starts from the run's seed alone (learner.learner.seeded_energy_head)."""

from __future__ import annotations

import torch

from learner.learner import seeded_energy_head


def _params(head: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in head.parameters()]


def test_same_seed_same_head_whatever_ran_before() -> None:
    torch.manual_seed(1)
    a = _params(seeded_energy_head(16, 8, seed=3))
    torch.randn(1000)  # the global generator moved on, as other set-up does before the head
    state = torch.get_rng_state()
    b = _params(seeded_energy_head(16, 8, seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    c = _params(seeded_energy_head(16, 8, seed=4))
    assert not torch.equal(a[0], c[0])
