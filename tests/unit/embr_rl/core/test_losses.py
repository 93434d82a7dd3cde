"""EMBR losses and baselines: hand-computed values, common random numbers, registry, wiring."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from embr_rl.core.config import AlgoConfig
from embr_rl.core.likelihood import bounds, fully_masked_token_logprobs
from embr_rl.core.losses import (
    LOSSES,
    LossBatch,
    LossModels,
    compute_energies,
    d1_objective,
    dpo_objective,
    embr_c_objective,
    embr_e_objective,
    embr_u_bracket,
    embr_u_objective,
    get_loss,
    kl_penalty,
    normalize_rewards,
    pair_within_groups,
    wd1_anchor,
    wd1_objective,
)
from embr_rl.core.masking import sample_masks, sample_prompt_mask
from embr_rl.core.models.energy_head import EnergyHead

MASK_ID = 31  # tests.conftest.TINY_MASK_ID

# --------------------------------------------------------------------------- hand-computed


def test_embr_e_and_c_hand_values() -> None:
    f = torch.tensor([1.0, -2.0, 0.5, 3.0])
    c = torch.tensor([0.5, 0.5, -1.0, -1.0])
    # (1.5^2 + 1.5^2 + 0.5^2 + 2^2) / 4
    assert float(embr_e_objective(f, c)) == pytest.approx(8.75 / 4)
    pairs = torch.tensor([[0, 1], [2, 3]])
    # ((1 + 2)^2 + (0.5 - 3)^2) / 2
    assert float(embr_c_objective(f, pairs)) == pytest.approx((9 + 6.25) / 2)


def test_embr_u_hand_values_and_branch_choice() -> None:
    lt = torch.tensor([-5.0, -6.0, -3.0, -7.0], requires_grad=True)
    ut = torch.tensor([-4.0, -5.5, -2.0, -6.0], requires_grad=True)
    lr = torch.tensor([-5.2, -5.9, -4.0, -6.0])
    ur = torch.tensor([-4.5, -5.0, -3.5, -5.5])
    r, beta = torch.tensor([1.0, 0.0, 0.0, 1.0]), 0.5
    pairs = torch.tensor([[0, 1], [2, 3]])
    dr = (r[pairs[:, 0]] - r[pairs[:, 1]]) / beta  # [2, -2]
    s_min, s_max = embr_u_bracket(lt, ut, lr, ur, dr, pairs)
    # pair 1: S_min = (-5+5.5) - (-4.5+5.9) - 2 = -2.9;  S_max = (-4+6) - (-5.2+5) - 2 = 0.2
    # pair 2: S_min = (-3+6) - (-3.5+6) + 2 = 2.5;     S_max = (-2+7) - (-4+5.5) + 2 = 5.5
    assert s_min.tolist() == pytest.approx([-2.9, 2.5])
    assert s_max.tolist() == pytest.approx([0.2, 5.5])
    loss = embr_u_objective(s_min, s_max)
    assert float(loss.detach()) == pytest.approx((2.9**2 + 5.5**2) / 2)
    loss.backward()
    # pair 1 takes the S_min branch (lt[0] enters S_min), pair 2 the S_max branch (ut[2])
    assert lt.grad[0] == pytest.approx(2 * -2.9 / 2)
    assert lt.grad[2] == 0.0 and ut.grad[2] == pytest.approx(2 * 5.5 / 2)
    assert ut.grad[0] == 0.0


def test_d1_clip_branches_and_k3() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.9], [0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.25, 1.0], [0.25, 0.5]]))  # ratios [[2, .9], [2, .5]]
    adv = torch.tensor([1.0, -1.0])
    ref = logp + math.log(2.0)  # k3 = 2 - log 2 - 1 on every token
    k3 = 1.0 - math.log(2.0)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, stats = d1_objective(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    # A>0: min(2, 1.2)=1.2, min(.9,.9)=.9 ; A<0: min(-2,-1.2)=-2, min(-.5,-.8)=-.8
    seq = [-(1.2 + 0.9) / 2, (2.0 + 0.8) / 2]
    assert float(loss) == pytest.approx(sum(seq) / 2 + 0.1 * k3)
    assert float(stats["kl"]) == pytest.approx(k3)
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 4)
    mask[1, 1] = False
    loss, _ = d1_objective(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    assert float(loss) == pytest.approx((seq[0] + 2.0) / 2 + 0.1 * k3)


def test_kl_estimators_hand_values_and_the_divergence_their_gradient_follows() -> None:
    """Exact enumeration over a 3-token vocabulary: as a loss on tokens drawn from ``pi``, k2's
    expected gradient is that of KL(pi || ref), k3's that of the forward KL(ref || pi)."""
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    d = math.log(2.0)
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([d * d / 2, d * d / 2])
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([0.5 + d - 1, 2 - d - 1])
    with pytest.raises(ValueError, match="allowed: k3, k2"):
        kl_penalty(logp, ref, "k1")

    theta = torch.tensor([0.3, -1.2, 0.8], requires_grad=True)
    ref_p = torch.tensor([0.6, 0.3, 0.1])

    def expected_grad(estimator: str) -> torch.Tensor:
        lp = torch.log_softmax(theta, -1)
        p = lp.exp().detach()
        loss = (
            p * kl_penalty(lp, ref_p.log(), estimator)
        ).sum()  # E_{y ~ pi}, pi not differentiated
        return torch.autograd.grad(loss, theta)[0]

    def grad_of(divergence: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(divergence, theta)[0]

    lp = torch.log_softmax(theta, -1)
    reverse = (lp.exp() * (lp - ref_p.log())).sum()
    assert torch.allclose(expected_grad("k2"), grad_of(reverse), atol=1e-6)
    lp = torch.log_softmax(theta, -1)
    forward = (ref_p * (ref_p.log() - lp)).sum()
    assert torch.allclose(expected_grad("k3"), grad_of(forward), atol=1e-6)


def test_d1_objective_takes_the_kl_estimator() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.zeros(1)
    loss, stats = d1_objective(
        logp, logp, ref, adv, mask, clip_eps=0.2, kl_coef=1.0, kl_estimator="k2"
    )
    assert float(loss) == pytest.approx(math.log(2.0) ** 2 / 2)
    assert float(stats["kl"]) == pytest.approx(math.log(2.0) ** 2 / 2)


def test_wd1_softmax_weights() -> None:
    seq = torch.tensor([-1.0, -2.0, -3.0, -4.0, -9.0])
    r = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5])
    gid = torch.tensor([0, 0, 0, 1, 1])
    adv = r - torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.5, 0.5])
    pos = [math.exp(2 / 3), math.exp(-1 / 3), math.exp(-1 / 3)]
    neg = [math.exp(-2 / 3), math.exp(1 / 3), math.exp(1 / 3)]
    expect = sum((n / sum(neg) - p / sum(pos)) * s for p, n, s in zip(pos, neg, [-1, -2, -3]))
    # the tied group has equal + and - weights and contributes nothing; 2 groups in the mean
    assert float(wd1_objective(seq, adv, gid)) == pytest.approx(expect / 2, rel=1e-6)


def test_dpo_sign_and_value() -> None:
    chosen = torch.tensor([2.0], requires_grad=True)
    rejected = torch.tensor([-1.0])
    loss = dpo_objective(chosen, rejected, beta=0.1)
    assert float(loss.detach()) == pytest.approx(math.log1p(math.exp(-0.3)))
    loss.backward()
    assert chosen.grad[0] < 0  # raising the chosen margin lowers the loss
    assert (
        float(dpo_objective(rejected, chosen.detach(), beta=0.1))
        > math.log(2)
        > float(loss.detach())
    )


def test_reward_norm_and_pairs() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    assert normalize_rewards(r, gid, "none") is r
    centred = normalize_rewards(r, gid, "center")
    assert centred.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -1, -1, 2])
    scaled = normalize_rewards(r, gid, "scale")
    assert float(scaled[3:].pow(2).mean()) == pytest.approx(1.0, rel=1e-5)
    pairs = pair_within_groups(gid, r)
    assert pairs.tolist() == [[0, 1], [5, 3]]


# --------------------------------------------------------------------------- with models


def _batch(model: torch.nn.Module, *, seed: int = 0, head: EnergyHead | None = None) -> LossBatch:
    g = torch.Generator().manual_seed(seed)
    b, p, length = 4, 5, 6
    prompt = torch.randint(2, 30, (b, p), generator=g)
    attn = torch.ones(b, p, dtype=torch.long)
    attn[1, :2] = 0  # left padding
    prompt[1, :2] = 0
    prompt[3] = prompt[2]
    prompt[1] = prompt[0]
    return LossBatch(
        prompt_ids=prompt,
        completion_ids=torch.randint(2, 30, (b, length), generator=g),
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        group_ids=torch.tensor([7, 7, 9, 9]),
        models=LossModels(
            policy=model,
            reference=copy.deepcopy(model).requires_grad_(False),
            mask_id=MASK_ID,
            energy_head=head,
            generator=torch.Generator().manual_seed(seed + 1),
        ),
        prompt_attention_mask=attn,
    )


def _cfg(name: str, **kw: object) -> AlgoConfig:
    return dataclasses.replace(AlgoConfig(), name=name, beta=0.5, micro_batch=64, **kw)


def test_registry_holds_every_configured_loss() -> None:
    names = dict((f.name, f) for f in dataclasses.fields(AlgoConfig))["name"].metadata["choices"]
    assert set(names) == set(LOSSES)
    with pytest.raises(KeyError, match="embr_c"):
        get_loss("grpo")


def test_crn_cancels_energies_in_embr_c(tiny_model: torch.nn.Module) -> None:
    batch = _batch(tiny_model)
    out = get_loss("embr_c")(batch, _cfg("embr_c"))
    # theta == ref on the same masks: (f - f')^2 = (Delta_r)^2 = (1/0.5)^2 on both pairs
    assert float(out.loss.detach()) == pytest.approx(4.0, abs=1e-5)
    assert out.metrics["learner/energy_policy"] == pytest.approx(out.metrics["learner/energy_ref"])
    assert out.metrics["learner/zero_reward_diff_share"] == 0.0
    out.loss.backward()
    # without common random numbers the likelihood terms no longer cancel
    off = get_loss("embr_c")(_batch(tiny_model), _cfg("embr_c", common_random_numbers=False))
    assert abs(float(off.loss.detach()) - 4.0) > 1e-2


def test_crn_cancels_energies_in_embr_e(tiny_model: torch.nn.Module) -> None:
    head = EnergyHead(64, 8)
    torch.nn.init.constant_(head.net[-1].bias, 0.7)
    batch = _batch(tiny_model, head=head)
    out = get_loss("embr_e")(batch, _cfg("embr_e"))
    r = batch.rewards
    # c_phi(x) = 0.7 for every prompt (zero last-layer weights): loss = mean (c - r/beta)^2
    assert float(out.loss.detach()) == pytest.approx(float(((0.7 - r / 0.5) ** 2).mean()), abs=1e-5)
    out.loss.backward()
    assert head.net[-1].bias.grad is not None and head.net[-1].bias.grad.abs() > 0


def test_embr_e_head_sees_only_the_prompt(tiny_model: torch.nn.Module) -> None:
    head = EnergyHead(64, 8)
    torch.nn.init.normal_(head.net[-1].weight)
    a = _batch(tiny_model, head=head)
    b = dataclasses.replace(a, completion_ids=(a.completion_ids + 1) % 30)
    cfg = _cfg("embr_e")
    a.models.generator.manual_seed(3)
    la = get_loss("embr_e")(a, cfg)
    a.models.generator.manual_seed(3)
    lb = get_loss("embr_e")(b, cfg)
    assert la.metrics["learner/c_mean"] == pytest.approx(lb.metrics["learner/c_mean"], abs=1e-6)
    la.loss.backward()
    assert any(p.grad is not None for p in tiny_model.parameters())


def test_embr_u_bracket_is_gap_sum_around_minus_delta_r(tiny_model: torch.nn.Module) -> None:
    cfg = _cfg("embr_u", antithetic=True, num_mc_samples=4, pair_common_masks=False)
    batch = _batch(tiny_model)
    out = get_loss("embr_u")(batch, cfg)
    # recompute the draw the loss used (same seed) and score the policy alone
    draw = sample_masks(
        batch.span(),
        4,
        scheme=cfg.timesteps,
        stratified=cfg.stratified,
        antithetic=True,
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        bd = bounds(
            tiny_model,
            batch.prompt_ids,
            batch.completion_ids,
            mask_id=MASK_ID,
            num_samples=4,
            gamma=cfg.eubo_gamma,
            attention_mask=batch.full_attention(),
            masks=draw,
        )
    gap = bd.eubo - bd.elbo
    pairs = pair_within_groups(batch.group_ids, batch.rewards)
    dr = (batch.rewards[pairs[:, 0]] - batch.rewards[pairs[:, 1]]) / 0.5
    half = gap[pairs[:, 0]] + gap[pairs[:, 1]]
    s_min, s_max = -dr - half, -dr + half
    assert float(out.loss.detach()) == pytest.approx(
        float(embr_u_objective(s_min, s_max)), rel=1e-5
    )
    assert out.metrics["learner/bracket_width"] == pytest.approx(float((2 * half).mean()), rel=1e-5)
    assert out.metrics["learner/eubo_coverage"] == 1.0
    inversions = 2 * int((gap < 0).sum())
    assert out.metrics["learner/bound_inversions"] == inversions


def test_micro_batch_and_forward_count(tiny_model: torch.nn.Module) -> None:
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kw: object):
            calls.append(kw["input_ids"].shape[0])
            return self.inner(**kw)

    batch = _batch(tiny_model)
    draw = sample_masks(batch.span(), 4, generator=torch.Generator().manual_seed(5))
    kw = {
        "mask_id": MASK_ID,
        "num_samples": 4,
        "masks": draw,
        "attention_mask": batch.full_attention(),
    }
    with torch.no_grad():
        whole = bounds(Counting(tiny_model), batch.prompt_ids, batch.completion_ids, **kw)
        assert calls == [16]
        calls.clear()
        parts = bounds(
            Counting(tiny_model), batch.prompt_ids, batch.completion_ids, micro_batch=5, **kw
        )
    assert calls == [5, 5, 5, 1]
    assert torch.allclose(whole.elbo, parts.elbo, atol=1e-4)
    assert torch.allclose(whole.eubo, parts.eubo, atol=1e-4)


def test_d1_shared_prompt_mask_gives_unit_ratio(tiny_model: torch.nn.Module) -> None:
    batch = _batch(tiny_model)
    pm = sample_prompt_mask(
        batch.prompt_ids,
        0.5,
        attention_mask=batch.prompt_attention_mask,
        generator=torch.Generator().manual_seed(4),
    )
    with torch.no_grad():
        old = fully_masked_token_logprobs(
            tiny_model,
            batch.prompt_ids,
            batch.completion_ids,
            mask_id=MASK_ID,
            attention_mask=batch.full_attention(),
            prompt_masks=pm,
        )
    batch = dataclasses.replace(batch, old_token_logp=old, prompt_masks=pm)
    out = get_loss("d1")(batch, _cfg("d1"))
    # ratio 1, k3 0 (theta == ref), group-centred advantages sum to 0 -> loss 0, nonzero grad
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert out.metrics["learner/kl"] == pytest.approx(0.0, abs=1e-6)
    assert out.metrics["learner/clip_fraction"] == 0.0
    out.loss.backward()
    grads = [p.grad.abs().sum() for p in tiny_model.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0
    with pytest.raises(ValueError, match="prompt_masks"):
        get_loss("d1")(dataclasses.replace(batch, prompt_masks=None), _cfg("d1"))


def test_wd1_loss_runs_and_differentiates(tiny_model: torch.nn.Module) -> None:
    out = get_loss("wd1")(_batch(tiny_model), _cfg("wd1"))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None for p in tiny_model.parameters())


def test_wd1_anchor_to_the_reference(tiny_model: torch.nn.Module) -> None:
    # kl_coef = 0: the paper's wd1, the reference never runs
    free = get_loss("wd1")(_batch(tiny_model), _cfg("wd1", kl_coef=0.0))
    assert "learner/kl" not in free.metrics
    # reference == policy: the anchor is 0 and the loss is the paper's
    same = get_loss("wd1")(_batch(tiny_model), _cfg("wd1", kl_coef=0.5))
    assert same.metrics["learner/kl"] == pytest.approx(0.0, abs=1e-9)
    assert float(same.loss.detach()) == pytest.approx(float(free.loss.detach()), abs=1e-6)
    # a moved reference: the loss grows by exactly kl_coef * mean_i sum_t k2
    batch = _batch(tiny_model)
    with torch.no_grad():
        for q in batch.models.reference.parameters():
            q.add_(0.05 * torch.randn_like(q))
    moved = get_loss("wd1")(batch, _cfg("wd1", kl_coef=0.5))
    kl = moved.metrics["learner/kl"]
    assert kl > 1e-4
    assert float(moved.loss.detach()) == pytest.approx(
        float(free.loss.detach()) + 0.5 * kl, rel=1e-5
    )
    assert float(wd1_anchor(torch.tensor([1.0, 3.0]), 0.25)) == pytest.approx(0.5)


def test_vrpo_shares_masks_dpo_does_not(tiny_model: torch.nn.Module) -> None:
    vrpo = get_loss("vrpo")(_batch(tiny_model), _cfg("vrpo"))
    assert float(vrpo.loss.detach()) == pytest.approx(math.log(2.0), abs=1e-5)
    assert vrpo.metrics["learner/dpo_margin"] == pytest.approx(0.0, abs=1e-5)
    dpo = get_loss("dpo")(_batch(tiny_model), _cfg("dpo"))
    assert abs(dpo.metrics["learner/dpo_margin"]) > 1e-3


def test_seeded_losses_repeat(tiny_model: torch.nn.Module) -> None:
    cfg = _cfg("embr_u", common_random_numbers=False)
    a = get_loss("embr_u")(_batch(tiny_model, seed=3), cfg)
    b = get_loss("embr_u")(_batch(tiny_model, seed=3), cfg)
    assert float(a.loss.detach()) == float(b.loss.detach())
    assert math.isfinite(float(a.loss.detach()))


def test_length_normalize_and_reward_scale(tiny_model: torch.nn.Module) -> None:
    batch = _batch(tiny_model)
    span = torch.ones_like(batch.completion_ids, dtype=torch.bool)
    span[0, 4:] = False
    batch = dataclasses.replace(batch, completion_mask=span)
    raw = compute_energies(batch, _cfg("embr_c"))
    batch.models.generator.manual_seed(1)
    normed = compute_energies(batch, _cfg("embr_c", length_normalize=True))
    n = span.sum(-1).float()
    assert torch.allclose(normed.lt, raw.lt / n, atol=1e-6)
    # theta == ref: L_CM = mean Delta_r^2 with group z-scored rewards (+-1 in each pair)
    out = get_loss("embr_c")(batch, _cfg("embr_c", reward_norm="scale"))
    assert float(out.loss.detach()) == pytest.approx((2 / 0.5) ** 2, rel=1e-4)


def test_pair_common_masks_cancel_shared_tokens(tiny_model: torch.nn.Module) -> None:
    from embr_rl.core.losses import compute_energies

    batch = _batch(tiny_model)
    batch.completion_ids[1] = batch.completion_ids[0]  # a pair of identical samples
    batch.prompt_ids[1] = batch.prompt_ids[0]
    if batch.prompt_attention_mask is not None:
        batch.prompt_attention_mask[1] = batch.prompt_attention_mask[0]
    pairs = torch.tensor([[0, 1], [2, 3]])
    on = compute_energies(batch, _cfg("embr_c"), pairs=pairs)
    assert float(on.lt[0] - on.lt[1]) == pytest.approx(0.0, abs=1e-6)
    off = compute_energies(batch, _cfg("embr_c", pair_common_masks=False), pairs=pairs)
    assert abs(float(off.lt[0] - off.lt[1])) > 1e-3


def test_blockwise_one_step_estimate(tiny_model: torch.nn.Module) -> None:
    from embr_rl.core.likelihood import blockwise_token_logprobs, fully_masked_token_logprobs

    batch = _batch(tiny_model)
    length = batch.completion_ids.shape[1]
    kw = {"mask_id": MASK_ID, "attention_mask": batch.full_attention()}
    with torch.no_grad():
        whole = fully_masked_token_logprobs(
            tiny_model, batch.prompt_ids, batch.completion_ids, **kw
        )
        one = blockwise_token_logprobs(
            tiny_model, batch.prompt_ids, batch.completion_ids, length, **kw
        )
        two = blockwise_token_logprobs(
            tiny_model, batch.prompt_ids, batch.completion_ids, length // 2, **kw
        )
    assert torch.allclose(one, whole)
    half = length // 2
    assert torch.allclose(two[:, :half], whole[:, :half])  # block 0: everything after masked
    # block 1 sees block 0 clean, so its conditionals differ from the fully masked ones
    assert not torch.allclose(two[:, half:], whole[:, half:])
