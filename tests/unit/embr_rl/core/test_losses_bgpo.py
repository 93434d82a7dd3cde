"""BGPO (our reading of its abstract, docs/objectives.md): the bound lies below the ELBO-ratio
objective, is linear in the draws, equals it in value and gradient on-policy; the loss on
the rows' seeded draws, its stale ratios from recorded behaviour log-probs, and its config."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from embr_toys import group_batch

from embr_rl.core.config import AlgoConfig, ConfigError, load_config
from embr_rl.core.losses import (
    LossBatch,
    bgpo_objective,
    draw_elbo_terms,
    draw_masks,
    get_loss,
    group_mean,
    traits_of,
    unigrpo_token_logprobs,
)

MASK_ID = 31  # tests.conftest.TINY_MASK_ID


def _cfg(**kw: object) -> AlgoConfig:
    return dataclasses.replace(AlgoConfig(), name="bgpo", micro_batch=64, block_length=3, **kw)


def _batch(model: torch.nn.Module) -> LossBatch:
    return group_batch(model, MASK_ID)


def _exact(delta: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """The ELBO-ratio objective the bound is of: ``mean_j A_j exp(mean_k delta_jk)``."""
    return (adv * torch.exp(delta.mean(-1))).mean()


def test_bgpo_objective_hand_values() -> None:
    delta = torch.tensor([[0.2, -0.4], [float(torch.tensor(2.0).log()), 0.0]])
    adv = torch.tensor([1.0, -1.0])
    # row 0: 1 * (1 + (0.2 - 0.4) / 2) = 0.9; row 1: -1 * (2 + 1) / 2 = -1.5
    assert float(bgpo_objective(delta, adv)) == pytest.approx((0.9 - 1.5) / 2)


def test_bgpo_bound_is_below_the_objective_linear_in_the_draws_and_exact_on_policy() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        delta = torch.randn(8, 4, generator=g, dtype=torch.float64)
        adv = torch.randn(8, generator=g, dtype=torch.float64)
        assert float(bgpo_objective(delta, adv)) <= float(_exact(delta, adv)) + 1e-12
        # linearity: the mean over draws of one-draw bounds
        one = torch.stack([bgpo_objective(delta[:, k : k + 1], adv) for k in range(4)])
        assert float(one.mean()) == pytest.approx(float(bgpo_objective(delta, adv)), rel=1e-12)
    # strictly below off-policy: the tangent where the mean log-ratio moves (A > 0), Jensen
    # where the draws disagree (A < 0)
    for a, d in ((1.0, [[0.5, 0.3]]), (-1.0, [[0.5, -0.5]])):
        adv, delta = torch.tensor([a], dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
        assert float(bgpo_objective(delta, adv)) < float(_exact(delta, adv)) - 1e-3
    # on-policy (delta = 0): value and gradient are the objective's
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    d0 = torch.zeros(8, 4, dtype=torch.float64, requires_grad=True)
    d1 = torch.zeros(8, 4, dtype=torch.float64, requires_grad=True)
    lb, ex = bgpo_objective(d0, adv), _exact(d1, adv)
    assert float(lb) == pytest.approx(float(ex))
    lb.backward()
    ex.backward()
    assert torch.allclose(d0.grad, d1.grad)


def test_bgpo_on_a_fresh_batch_is_the_advantage_weighted_elbo_gradient(
    tiny_model: torch.nn.Module,
) -> None:
    """On-policy the loss's gradient is ``-mean_j A_j grad ELBO(y_j)``: SPG with the ELBO on
    every row (``spg_mix=0``), the same draws, no anchor."""
    cfg = _cfg(num_mc_samples=2, kl_coef=0.0)
    batch = _batch(tiny_model)
    out = get_loss("bgpo")(batch, cfg)
    adv = batch.rewards - group_mean(batch.rewards, batch.group_ids)
    assert float(out.loss.detach()) == pytest.approx(-float(adv.mean()), abs=1e-6)
    assert out.metrics["learner/log_ratio_mean"] == pytest.approx(0.0, abs=1e-9)
    out.loss.backward()
    got = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    spg = get_loss("spg")(batch, dataclasses.replace(cfg, name="spg", spg_mix=0.0))
    spg.loss.backward()
    assert any(float(a.abs().sum()) > 0 for a in got)
    for a, p in zip(got, tiny_model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_bgpo_ratios_are_to_the_recorded_behaviour_log_probs(tiny_model: torch.nn.Module) -> None:
    """Stale rows: the old per-draw terms come from the behaviour policy's token log-probs on
    the rows' seeded draws (what rollout.record_logprobs stores); recorded by this very policy
    the ratio is 1, recorded by another one the loss is the bound of their difference."""
    cfg = _cfg(num_mc_samples=2, kl_coef=0.0, pair_common_masks=False)
    batch = _batch(tiny_model)
    with torch.no_grad():
        own, _ = unigrpo_token_logprobs(batch, cfg, tiny_model)
    fresh = get_loss("bgpo")(batch, cfg)
    same = get_loss("bgpo")(dataclasses.replace(batch, old_token_logp=own.reshape(6, -1)), cfg)
    assert float(same.loss) == pytest.approx(float(fresh.loss), abs=1e-6)
    assert same.metrics["learner/behaviour_logp"] == 1.0
    behaviour = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for prm in behaviour.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
        old, _ = unigrpo_token_logprobs(batch, cfg, behaviour)
    stale = get_loss("bgpo")(dataclasses.replace(batch, old_token_logp=old.reshape(6, -1)), cfg)
    draw = draw_masks(batch.span(), cfg, seeds=batch.mask_seeds)
    delta = draw_elbo_terms(own, draw) - draw_elbo_terms(old, draw)
    adv = batch.rewards - group_mean(batch.rewards, batch.group_ids)
    assert float(delta.abs().mean()) > 1e-2
    assert float(stale.loss.detach()) == pytest.approx(-float(bgpo_objective(delta, adv)), rel=1e-5)
    wrong = dataclasses.replace(batch, old_token_logp=old.reshape(6, -1)[:, :6])
    with pytest.raises(ValueError, match="num_mc_samples"):
        get_loss("bgpo")(wrong, cfg)


def test_bgpo_traits_and_config_rules() -> None:
    t = traits_of("bgpo")
    assert t.family == "policy_gradient" and t.needs_fresh_rollouts and t.draw_ratio
    assert t.group_masks and not t.energies
    with pytest.raises(ConfigError, match=r"algo\.name.*needs fresh rollouts"):
        load_config(None, ["algo.name=bgpo", "algo.mode=offline", "buffer.offline_path=x.jsonl"])
    with pytest.raises(ConfigError, match=r"algo\.inner_iterations.*record_logprobs=true"):
        load_config(None, ["algo.name=bgpo", "algo.inner_iterations=2"])
    stale = ["algo.name=bgpo", "algo.inner_iterations=2", "rollout.record_logprobs=true"]
    assert load_config(None, stale).algo.inner_iterations == 2
    with pytest.raises(ConfigError, match=r"algo\.kl_estimator.*'k2'"):
        load_config(None, ["algo.name=bgpo", "algo.kl_estimator=k3"])
