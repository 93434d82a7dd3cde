"""UniGRPO and SPG: hand values, SPG's sandwich on an enumerable model, UniGRPO's noising and
its policy gradient at ratio 1, and their wiring (seeded draws, config rules)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from embr_toys import JointModel, exact_elbo, exact_eubo, group_batch, subset_table

from embr_rl.core.config import AlgoConfig, ConfigError, load_config
from embr_rl.core.likelihood import completion_logprobs
from embr_rl.core.losses import (
    LossBatch,
    _group_leaders,
    draw_masks,
    get_loss,
    group_mean,
    normalize_rewards,
    reference_energies,
    share_within_pairs,
    spg_anchor,
    spg_objective,
    traits_of,
    unigrpo_token_logprobs,
)

MASK_ID = 31  # tests.conftest.TINY_MASK_ID


def _cfg(name: str, **kw: object) -> AlgoConfig:
    return dataclasses.replace(AlgoConfig(), name=name, micro_batch=64, block_length=3, **kw)


def _batch(model: torch.nn.Module, *, seeds: bool = True) -> LossBatch:
    return group_batch(model, MASK_ID, seeds=seeds)


# --------------------------------------------------------------------------- SPG


def test_spg_objective_hand_values() -> None:
    lower = torch.tensor([-5.0, -6.0, -3.0, -7.0])
    upper = torch.tensor([-4.0, -5.0, -2.0, -6.0])
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    # negatives use 0.5 EUBO + 0.5 ELBO: -5.5 and -6.5
    j, surrogate = spg_objective(lower, upper, adv, 0.5)
    assert surrogate.tolist() == pytest.approx([-5.0, -5.5, -3.0, -6.5])
    assert float(j) == pytest.approx((0.5 * -5 + -0.5 * -5.5 + 1 * -3 + -1 * -6.5) / 4)
    j_eubo, _ = spg_objective(lower, upper, adv, 1.0)
    assert float(j_eubo) == pytest.approx((-2.5 + 2.5 - 3 + 6) / 4)


@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0])
def test_spg_sandwich_lies_below_the_advantage_weighted_log_likelihood(gamma: float) -> None:
    """On a model with one joint distribution the exact ELBO is ``log p`` and the exact EUBO
    is above it, so SPG's objective (EUBO on negatives) is below ``mean A log p``; the
    ELBO-only objective is not a bound once any advantage is negative."""
    vocab, length, plen = 3, 4, 2
    joint = JointModel(vocab, length, plen, seed=0)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, vocab, (plen,), generator=g)
    ys = [torch.randint(0, vocab, (length,), generator=g) for _ in range(4)]
    tabs = [subset_table(joint, prompt, y, vocab) for y in ys]
    logp = torch.tensor([joint.log_joint(y) for y in ys], dtype=torch.float64)
    lower = torch.tensor([exact_elbo(t) for t in tabs], dtype=torch.float64)
    upper = torch.tensor([exact_eubo(t, gamma) for t in tabs], dtype=torch.float64)
    assert torch.all(lower <= logp + 1e-9) and torch.all(logp <= upper + 1e-9)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv = rewards - rewards.mean()
    j_true = float((adv * logp).mean())
    j_spg, _ = spg_objective(lower, upper, adv, 1.0)
    assert float(j_spg) <= j_true + 1e-9
    if gamma > 1:  # the EUBO is strictly above log p: a strict bound
        assert float(j_spg) < j_true - 1e-6
    for mix in (0.25, 0.5, 0.75):  # a mixture lies between the two
        j_mix, _ = spg_objective(lower, upper, adv, mix)
        assert float(j_spg) - 1e-9 <= float(j_mix) <= j_true + 1e-9
    # Swap the branches (EUBO on the positives) and the "bound" is above the truth.
    wrong = (adv * torch.where(adv >= 0, upper, lower)).mean()
    if gamma > 1:
        assert float(wrong) > j_true


def test_spg_loss_is_the_objective_on_the_rows_seeded_draws(tiny_model: torch.nn.Module) -> None:
    cfg = _cfg("spg", num_mc_samples=2, spg_mix=0.3, pair_common_masks=False)
    batch = _batch(tiny_model)
    out = get_loss("spg")(batch, cfg)
    with torch.no_grad():
        lower, upper = reference_energies(batch, cfg, upper=True)  # scores batch.models.policy
    assert upper is not None
    adv = batch.rewards - group_mean(batch.rewards, batch.group_ids)
    want, _ = spg_objective(lower, upper, adv, 0.3)
    assert float(out.loss.detach()) == pytest.approx(-float(want), rel=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())
    assert out.metrics["learner/negative_share"] == pytest.approx(0.5)


def test_spg_anchor_is_the_masked_token_k2_on_the_same_draws(tiny_model: torch.nn.Module) -> None:
    cfg = _cfg("spg", num_mc_samples=2, pair_common_masks=False)
    batch = _batch(tiny_model)
    free = get_loss("spg")(batch, dataclasses.replace(cfg, kl_coef=0.0))
    assert "learner/kl" not in free.metrics
    # the reference is the policy: the anchor is 0 on common draws
    same = get_loss("spg")(batch, dataclasses.replace(cfg, kl_coef=0.5))
    assert same.metrics["learner/kl"] == pytest.approx(0.0, abs=1e-9)
    assert float(same.loss.detach()) == pytest.approx(float(free.loss.detach()), rel=1e-6)
    with torch.no_grad():
        for prm in batch.models.reference.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    moved = get_loss("spg")(batch, dataclasses.replace(cfg, kl_coef=0.5))
    # by hand: the rows' seeded draws, both models' token log-probs on them
    draw = draw_masks(batch.span(), cfg, seeds=batch.mask_seeds)
    with torch.no_grad():
        lp, lr = (
            completion_logprobs(
                model, batch.prompt_ids, batch.completion_ids, draw.input_masks(), mask_id=MASK_ID
            )
            for model in (batch.models.policy, batch.models.reference)
        )
    m = draw.masks.float()
    per_draw = (0.5 * (lp - lr) ** 2 * m).sum(-1) / m.sum(-1)
    want = per_draw.mean(-1) * batch.span().sum(-1)
    assert float(want.mean()) > 1e-3
    assert moved.metrics["learner/kl"] == pytest.approx(float(want.mean()), rel=1e-4)
    assert torch.allclose(spg_anchor(lp, lr, draw.masks, batch.span().sum(-1)), want)
    assert float(moved.loss.detach()) == pytest.approx(
        float(free.loss.detach()) + 0.5 * float(want.mean()), rel=1e-4
    )
    no_ref = dataclasses.replace(batch, models=dataclasses.replace(batch.models, reference=None))
    with pytest.raises(ValueError, match="reference"):
        get_loss("spg")(no_ref, dataclasses.replace(cfg, kl_coef=0.5))


def test_spg_scores_a_group_on_its_first_rows_masks(tiny_model: torch.nn.Module) -> None:
    cfg = _cfg("spg", num_mc_samples=2)
    batch = _batch(tiny_model, seeds=False)
    leaders = _group_leaders(batch.group_ids)
    assert leaders.tolist() == [[0, 1], [0, 2], [3, 4], [3, 5]]
    draw = share_within_pairs(draw_masks(batch.span(), cfg), leaders, batch.span())
    for a, b in leaders.tolist():
        assert torch.equal(draw.masks[a], draw.masks[b])


# --------------------------------------------------------------------------- UniGRPO


class _Spy(torch.nn.Module):
    """Wraps a model and records every input it is given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, **kw: object):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids=input_ids, **kw)


@pytest.mark.parametrize("masking", ["random", "block"])
def test_unigrpo_masks_the_completion_only_at_a_ratio_per_response(
    tiny_model: torch.nn.Module, masking: str
) -> None:
    spy = _Spy(tiny_model)
    cfg = _cfg("unigrpo", num_mc_samples=1, masking=masking)
    batch = _batch(spy)
    logp, draw = unigrpo_token_logprobs(batch, cfg, spy)
    (inputs,) = spy.inputs
    p = batch.prompt_ids.shape[1]
    assert torch.equal(inputs[:, :p], batch.prompt_ids)  # the prompt stays clean
    masked = inputs[:, p:] == MASK_ID
    assert torch.equal(masked, draw.input_masks()[:, 0])
    assert logp.shape == (6, 1, 6) and draw.masks.any(-1).all()  # every response is scored
    ratios = draw.masks.sum(-1).squeeze(1).tolist()
    assert len(set(ratios)) > 1  # each response draws its own ratio
    if masking == "block":  # one block scored, later blocks hidden
        assert (draw.masks.squeeze(1).reshape(6, 2, 3).any(-1).sum(-1) == 1).all()


def test_unigrpo_at_ratio_one_is_the_group_normalised_policy_gradient(
    tiny_model: torch.nn.Module,
) -> None:
    cfg = _cfg("unigrpo", num_mc_samples=2, kl_coef=0.0, masking="random")
    batch = _batch(tiny_model)
    out = get_loss("unigrpo")(batch, cfg)
    # rho = 1 on a fresh batch: the loss is -mean(A) = 0 for group-normalised advantages.
    assert float(out.loss) == pytest.approx(0.0, abs=1e-6)
    out.loss.backward()
    got = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    logp, draw = unigrpo_token_logprobs(batch, cfg, tiny_model)  # the same seeded draws
    adv = normalize_rewards(batch.rewards, batch.group_ids, "scale")
    m = draw.masks.to(logp.dtype)
    per_draw = (logp * m).sum(-1) / m.sum(-1).clamp(min=1)  # mean over masked tokens
    (-(adv[:, None] * per_draw).mean()).backward()
    for a, p in zip(got, tiny_model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_unigrpo_kl_term_is_zero_at_the_reference_and_positive_away(
    tiny_model: torch.nn.Module,
) -> None:
    cfg = _cfg("unigrpo", kl_coef=0.1)
    batch = _batch(tiny_model)
    assert get_loss("unigrpo")(batch, cfg).metrics["learner/kl"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        for prm in batch.models.reference.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    default = get_loss("unigrpo")(batch, cfg).metrics["learner/kl"]
    assert default > 1e-4
    # UniGRPO's own estimator is k2 (d1 keeps its paper's k3): the same value as asked for.
    k2 = dataclasses.replace(cfg, kl_estimator="k2")
    k3 = dataclasses.replace(cfg, kl_estimator="k3")
    assert get_loss("unigrpo")(batch, k2).metrics["learner/kl"] == pytest.approx(default)
    assert get_loss("unigrpo")(batch, k3).metrics["learner/kl"] != pytest.approx(default)


def test_seeded_draws_do_not_depend_on_the_batch(tiny_model: torch.nn.Module) -> None:
    cfg = _cfg("spg")
    batch = _batch(tiny_model)
    full = draw_masks(batch.span(), cfg, seeds=batch.mask_seeds)
    alone = draw_masks(batch.span()[2:3], cfg, seeds=batch.mask_seeds[2:3])
    assert torch.equal(full.masks[2:3], alone.masks)


# --------------------------------------------------------------------------- config


def test_traits_and_the_modes_they_allow() -> None:
    for name in ("unigrpo", "spg"):
        t = traits_of(name)
        assert t.family == "policy_gradient" and t.needs_fresh_rollouts and not t.energies
        with pytest.raises(ConfigError, match=r"algo\.name.*needs fresh rollouts"):
            load_config(
                None, [f"algo.name={name}", "algo.mode=offline", "buffer.offline_path=x.jsonl"]
            )
        assert load_config(None, [f"algo.name={name}", "algo.mode=sync"]).algo.name == name
    assert traits_of("spg").upper_bound
    with pytest.raises(ConfigError, match=r"algo\.inner_iterations.*record_logprobs=true"):
        load_config(None, ["algo.name=unigrpo", "algo.inner_iterations=2"])
    stale = ["algo.name=unigrpo", "algo.inner_iterations=2", "rollout.record_logprobs=true"]
    assert load_config(None, stale).algo.inner_iterations == 2
    with pytest.raises(ConfigError, match=r"rollout\.score_reference"):
        load_config(None, ["algo.name=spg", "rollout.score_reference=true"])
    with pytest.raises(ConfigError, match=r"algo\.spg_mix"):
        load_config(None, ["algo.name=spg", "algo.spg_mix=1.5"])
    with pytest.raises(ConfigError, match=r"algo\.kl_estimator.*'k2'"):
        load_config(None, ["algo.name=spg", "algo.kl_estimator=k3"])
    assert load_config(None, ["algo.name=spg", "algo.kl_estimator=k2"]).algo.kl_estimator == "k2"
