"""EMBR objectives and baselines, one registry: ``loss_fn(batch, cfg) -> LossOutput``.

EMBR-E, EMBR-C, EMBR-U (DESIGN §4.2, paper eqs. 9, 13, 19-21) and the baselines d1
(diffu-GRPO), wd1, UniGRPO, SPG, BGPO, DPO-ELBO and VRPO (DESIGN §4.3, docs/objectives.md). Each loss comes in two layers: a pure
tensor *objective* (hand-checkable, used by the toy tests) and a registered ``loss_fn`` that
computes the likelihood terms with the models carried in ``batch.models``.

Choose a loss once with :func:`get_loss` (keyed by ``AlgoConfig.name``); never compare names
in the training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embr_rl.core.config import KL_ESTIMATORS, AlgoConfig
from embr_rl.core.likelihood import (
    blockwise_token_logprobs,
    completion_logprobs,
    elbo_from_logprobs,
    eubo_from_logprobs,
    fully_masked_token_logprobs,
)
from embr_rl.core.masking import MaskDraw, sample_block_masks, sample_masks, sample_prompt_mask

if TYPE_CHECKING:  # importing embr_rl.core.models loads transformers; only embr_e needs it
    from embr_rl.core.models.energy_head import EnergyHead

__all__ = [
    "LOSSES",
    "LOSS_TRAITS",
    "Energies",
    "LossBatch",
    "LossFn",
    "LossModels",
    "LossOutput",
    "LossTraits",
    "bgpo_loss",
    "bgpo_objective",
    "compute_energies",
    "d1_objective",
    "d1_token_logprobs",
    "dpo_objective",
    "draw_elbo_terms",
    "draw_masks",
    "embr_c_objective",
    "embr_e_objective",
    "embr_u_bracket",
    "embr_u_objective",
    "get_loss",
    "group_mean",
    "kl_penalty",
    "normalize_rewards",
    "pair_within_groups",
    "reference_energies",
    "register_loss",
    "share_within_pairs",
    "spg_anchor",
    "spg_loss",
    "spg_objective",
    "traits_of",
    "unigrpo_loss",
    "unigrpo_token_logprobs",
    "wd1_anchor",
    "wd1_objective",
]


# --------------------------------------------------------------------------- batch types


@dataclass
class LossModels:
    """What a loss needs besides data; built once by the learner and attached to every batch.

    ``reference`` is frozen (scored under ``no_grad``); ``energy_head`` is required by
    ``embr_e`` only and must be in the optimiser with the policy; ``generator`` seeds every
    mask draw (None: the global RNG).
    """

    policy: nn.Module
    mask_id: int
    reference: nn.Module | None = None
    energy_head: EnergyHead | None = None
    generator: torch.Generator | None = None


@dataclass
class LossBatch:
    """One learner batch of ``B`` scored completions.

    ``prompt_ids`` [B, P] (left-padded), ``completion_ids`` [B, L], ``rewards`` [B] (raw; the
    loss normalises per group as configured), ``group_ids`` [B] (same id = same prompt).
    Optional: ``prompt_attention_mask`` [B, P] (1 = real token; None = no padding),
    ``completion_mask`` [B, L] (the likelihood span; None = every position), ``pairs``
    [M, 2] row indices of same-prompt pairs for embr_c/embr_u/dpo/vrpo (None: built by
    :func:`pair_within_groups`), and for d1 ``old_token_logp`` [B, L] (None: the current
    policy, detached, i.e. the first inner iteration) with the ``prompt_masks`` [B, P] they
    were computed with (None: drawn here; must be given together with ``old_token_logp``).
    ``mask_seeds`` [B] (int64): each row's mask draws come from its own seed
    (:func:`draw_masks`), the same wherever the row is scored; with them, ``ref_lower`` and
    ``ref_upper`` [B] are the frozen reference's ELBO and EUBO on those draws, scored once
    when the row was made (``rollout.score_reference``), so the reference is not run again.
    """

    prompt_ids: Tensor
    completion_ids: Tensor
    rewards: Tensor
    group_ids: Tensor
    models: LossModels
    prompt_attention_mask: Tensor | None = None
    completion_mask: Tensor | None = None
    pairs: Tensor | None = None
    old_token_logp: Tensor | None = None
    prompt_masks: Tensor | None = None
    mask_seeds: Tensor | None = None
    ref_lower: Tensor | None = None
    ref_upper: Tensor | None = None

    def span(self) -> Tensor:
        if self.completion_mask is None:
            return torch.ones_like(self.completion_ids, dtype=torch.bool)
        return self.completion_mask.bool()

    def full_attention(self) -> Tensor | None:
        if self.prompt_attention_mask is None:
            return None
        ones = torch.ones_like(self.completion_ids, dtype=self.prompt_attention_mask.dtype)
        return torch.cat([self.prompt_attention_mask, ones], dim=-1)


@dataclass
class LossOutput:
    """``loss`` (scalar, differentiable) and ``metrics`` (``learner/...`` -> float)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


LossFn = Callable[[LossBatch, AlgoConfig], LossOutput]
LOSSES: dict[str, LossFn] = {}


@dataclass(frozen=True)
class LossTraits:
    """What the rest of the system must know about a loss, registered with it.

    ``pairwise``: trains on two completions of one prompt (the learner draws pairs).
    ``energy_head``: needs the EMBR-E value head. ``one_step``: scores a completion with
    one fully masked forward (d1's estimator), so one mask draw, and needs fresh rollouts
    (no offline mode). ``family``: ``embr``, ``policy_gradient`` or ``preference``.
    ``energies``: scores policy and reference with :func:`compute_energies` on the algo's own
    mask draws (so ``rollout.score_reference`` can score the reference once per row);
    ``upper_bound``: with the EUBO too. ``fresh``: a policy-gradient estimator that needs
    fresh rollouts although it is not one-step (UniGRPO, SPG, BGPO). ``draw_ratio``: its
    ratio is per mask draw, to the behaviour policy's token log-probs on the rows' seeded
    draws (UniGRPO, BGPO), which ``rollout.record_logprobs`` records in that shape.
    ``group_masks``: with ``algo.pair_common_masks`` every row of a group is scored on its
    first row's masks (SPG, BGPO), so the workers seed a group's rows alike.
    """

    family: str
    pairwise: bool = False
    energy_head: bool = False
    one_step: bool = False
    energies: bool = False
    upper_bound: bool = False
    fresh: bool = False
    draw_ratio: bool = False
    group_masks: bool = False

    @property
    def needs_fresh_rollouts(self) -> bool:
        """No offline mode: the estimator assumes the rows come from (nearly) this policy."""
        return self.one_step or self.fresh


LOSS_TRAITS: dict[str, LossTraits] = {}


def register_loss(name: str, traits: LossTraits) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` and its :class:`LossTraits` under an ``AlgoConfig.name`` value."""

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = fn
        LOSS_TRAITS[name] = traits
        return fn

    return wrap


def traits_of(name: str) -> LossTraits:
    """The traits of the loss ``name``; raises ``KeyError`` naming the allowed values."""
    get_loss(name)
    return LOSS_TRAITS[name]


def get_loss(name: str) -> LossFn:
    """The loss registered under ``name``; raises ``KeyError`` naming the allowed values."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}") from None


# --------------------------------------------------------------------------- group helpers


def group_mean(x: Tensor, group_ids: Tensor) -> Tensor:
    """[B]: the mean of ``x`` over each row's group."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 0
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, inv, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, inv, torch.ones_like(x))
    return (total / count)[inv]


def normalize_rewards(rewards: Tensor, group_ids: Tensor, mode: str) -> Tensor:
    """Per-group reward normalisation (DESIGN §4.2): ``none``, ``center`` or ``scale`` (z-score)."""
    r = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    if mode == "none":
        return r
    centred = r - group_mean(r, group_ids)
    if mode == "center":
        return centred
    std = group_mean(centred**2, group_ids).sqrt()
    return centred / (std + 1e-6)


def pair_within_groups(group_ids: Tensor, rewards: Tensor) -> Tensor:
    """[M, 2] same-group pairs preferring ``r != r'``: sorted by reward, k-th lowest with k-th highest."""
    pairs: list[tuple[int, int]] = []
    for g in torch.unique(group_ids).tolist():
        idx = (group_ids == g).nonzero().flatten()
        order = idx[torch.argsort(rewards[idx], stable=True)].tolist()
        for k in range(len(order) // 2):
            pairs.append((order[-1 - k], order[k]))
    return torch.tensor(pairs, dtype=torch.long, device=group_ids.device).reshape(-1, 2)


def _segment_softmax(x: Tensor, group_ids: Tensor) -> Tensor:
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = int(inv.max()) + 1
    peak = torch.full((n,), -torch.inf, dtype=x.dtype, device=x.device)
    peak = peak.scatter_reduce(0, inv, x, reduce="amax")
    e = torch.exp(x - peak[inv])
    denom = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, inv, e)
    return e / denom[inv]


# --------------------------------------------------------------------------- pure objectives


def embr_e_objective(f: Tensor, c: Tensor) -> Tensor:
    """``L_EM = mean (f(y) + c(x))^2`` (DESIGN §4.2, paper eq. 9)."""
    return ((f + c) ** 2).mean()


def embr_c_objective(f: Tensor, pairs: Tensor) -> Tensor:
    """``L_CM = mean (f(y) - f(y'))^2`` over ``pairs`` [M, 2] (DESIGN §4.2, paper eq. 13)."""
    return ((f[pairs[:, 0]] - f[pairs[:, 1]]) ** 2).mean()


def embr_u_bracket(
    lt: Tensor, ut: Tensor, lr: Tensor, ur: Tensor, dr: Tensor, pairs: Tensor
) -> tuple[Tensor, Tensor]:
    """``(S_min, S_max)`` [M] of paper eqs. 19-20; ``dr = (r - r')/beta`` [M]."""
    a, b = pairs[:, 0], pairs[:, 1]
    s_min = (lt[a] - ut[b]) - (ur[a] - lr[b]) - dr
    s_max = (ut[a] - lt[b]) - (lr[a] - ur[b]) - dr
    return s_min, s_max


def embr_u_objective(s_min: Tensor, s_max: Tensor) -> Tensor:
    """``L_UCM = mean max(S_min^2, S_max^2)`` (DESIGN §4.2, paper eq. 21)."""
    return torch.maximum(s_min**2, s_max**2).mean()


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of ``KL(pi || ref)`` on tokens sampled from ``pi``, used as a loss term.

    ``k3 = e^{ref-logp} - (ref-logp) - 1`` (GRPO's, d1's): an unbiased value, but as a loss its
    on-policy gradient is ``-sum_y ref(y) grad log pi(y)``, the gradient of the *forward*
    ``KL(ref || pi)``, which grows like ``ref / pi`` on a token whose probability was pushed down.
    ``k2 = (logp - ref)^2 / 2``: its on-policy gradient ``E_pi[(log pi - log ref) grad log pi]``
    is exactly that of ``KL(pi || ref)``, linear in the log-ratio.
    """
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")


def d1_objective(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float,
    kl_coef: float,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """diffu-GRPO token loss (DESIGN §4.3): PPO clip on per-token ratios plus ``kl_coef * KL``.

    Per token ``-min(rho A, clip(rho, 1-eps, 1+eps) A) + kl_coef k(logp, ref)`` with ``k`` the
    :func:`kl_penalty` estimator (``k3``: ``e^{ref-logp} - (ref-logp) - 1``); averaged over
    each sequence's ``mask`` positions, then over sequences.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    m = mask.to(logp.dtype)
    stats = {"clip_fraction": ((clipped < unclipped).to(m.dtype) * m).sum() / m.sum().clamp(min=1)}
    if ref_logp is not None and kl_coef > 0:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + kl_coef * kl
        stats["kl"] = (kl * m).sum() / m.sum().clamp(min=1)
    per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_seq.mean(), stats


def wd1_objective(seq_logp: Tensor, advantages: Tensor, group_ids: Tensor) -> Tensor:
    """wd1 (DESIGN §4.3): per group ``-sum softmax(A) log pi + sum softmax(-A) log pi``, mean over groups."""
    w_pos = _segment_softmax(advantages, group_ids)
    w_neg = _segment_softmax(-advantages, group_ids)
    n_groups = torch.unique(group_ids).numel()
    return ((w_neg - w_pos) * seq_logp).sum() / n_groups


def wd1_anchor(seq_kl: Tensor, kl_coef: float) -> Tensor:
    """Our reference anchor for wd1 (its paper has none): ``kl_coef * mean_i KL_i``, each row's
    span-summed per-token KL estimate weighted ``1/G`` in its group, as wd1's softmax weighs a
    row at zero advantage, so ``kl_coef`` trades against the advantage as d1's does."""
    return kl_coef * seq_kl.mean()


def dpo_objective(
    margin_chosen: Tensor, margin_rejected: Tensor, beta: float, weight: Tensor | None = None
) -> Tensor:
    """DPO-ELBO: ``-log sigmoid(beta ((L_theta - L_ref)(y_w) - (L_theta - L_ref)(y_l)))``, mean over pairs."""
    losses = -F.logsigmoid(beta * (margin_chosen - margin_rejected))
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum().clamp(min=1)


# --------------------------------------------------------------------------- likelihood terms


@dataclass
class Energies:
    """ELBO (and EUBO) [B] of policy and reference on the batch, length-normalised if configured."""

    lt: Tensor
    lr: Tensor
    ut: Tensor | None
    ur: Tensor | None
    coverage: Tensor | None
    reference_cached: bool = False


def _blocked(cfg: AlgoConfig) -> bool:
    """Block-wise masking on (``block_length`` None: one block spanning the window, which is
    the whole-window estimator itself)."""
    return cfg.masking == "block" and cfg.block_length is not None


def _draw_logprobs(model: nn.Module, batch: LossBatch, draw: MaskDraw, cfg: AlgoConfig) -> Tensor:
    """[B, n, L] ``log pi(y_i | x, z_k)`` of ``model`` on the batch under ``draw``."""
    return completion_logprobs(
        model,
        batch.prompt_ids,
        batch.completion_ids,
        draw.input_masks(),
        mask_id=batch.models.mask_id,
        attention_mask=batch.full_attention(),
        micro_batch=cfg.micro_batch,
    )


def _score(
    model: nn.Module, batch: LossBatch, draw: MaskDraw, cfg: AlgoConfig, gamma: float | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    logp = _draw_logprobs(model, batch, draw, cfg)
    lower = elbo_from_logprobs(logp, draw)
    if gamma is None:
        return lower, None, None
    return (lower, *_eubo(logp, batch, draw, cfg, gamma, lower))


def _eubo(
    logp: Tensor, batch: LossBatch, draw: MaskDraw, cfg: AlgoConfig, gamma: float, lower: Tensor
) -> tuple[Tensor, Tensor]:
    """The EUBO [B] and its coverage [B] from the draws' log-probs (``lower``: their ELBO)."""
    return eubo_from_logprobs(
        logp,
        draw,
        gamma,
        batch.span(),
        estimator=cfg.eubo_estimator,
        lower=lower,
        block_length=cfg.block_length if _blocked(cfg) else None,
    )


def draw_masks(
    span: Tensor,
    cfg: AlgoConfig,
    *,
    generator: torch.Generator | None = None,
    seeds: Tensor | None = None,
    stratified: bool | None = None,
    antithetic: bool | None = None,
) -> MaskDraw:
    """``algo.num_mc_samples`` mask draws per row of ``span`` [B, L] (DESIGN §4.1), block-wise
    or over the window as ``algo.masking`` says.

    With ``seeds`` [B] each row is drawn alone from ``torch.Generator().manual_seed(seed)``,
    so a row of a given width gets the same draws in any batch, in the rollout worker and in
    the learner.
    """
    knobs = {
        "scheme": cfg.timesteps,
        "stratified": cfg.stratified if stratified is None else stratified,
        "antithetic": cfg.antithetic if antithetic is None else antithetic,
    }

    def one(rows: Tensor, gen: torch.Generator | None) -> MaskDraw:
        if _blocked(cfg):
            assert cfg.block_length is not None
            return sample_block_masks(
                rows, cfg.num_mc_samples, cfg.block_length, generator=gen, **knobs
            )
        return sample_masks(rows, cfg.num_mc_samples, generator=gen, **knobs)

    if seeds is None:
        return one(span, generator)
    rows = [
        one(span[i : i + 1], torch.Generator().manual_seed(seed))
        for i, seed in enumerate(seeds.tolist())
    ]
    hidden = None
    if all(d.hidden is not None for d in rows):
        hidden = torch.cat([d.hidden for d in rows])  # type: ignore[misc]
    return MaskDraw(
        torch.cat([d.masks for d in rows]), torch.cat([d.weights for d in rows]), hidden
    )


@torch.no_grad()
def reference_energies(
    batch: LossBatch, cfg: AlgoConfig, *, upper: bool
) -> tuple[Tensor, Tensor | None]:
    """The ELBO (and with ``upper`` the EUBO) [B] of ``batch.models.policy``, here the frozen
    reference, on the draws of ``batch.mask_seeds``: what :func:`compute_energies` scores the
    reference on for the same rows, before any length normalisation."""
    if batch.mask_seeds is None:
        raise ValueError("reference_energies needs batch.mask_seeds")
    draw = draw_masks(batch.span(), cfg, seeds=batch.mask_seeds)
    lower, up, _ = _score(batch.models.policy, batch, draw, cfg, cfg.eubo_gamma if upper else None)
    return lower, up


def compute_energies(
    batch: LossBatch,
    cfg: AlgoConfig,
    *,
    upper: bool = False,
    stratified: bool | None = None,
    antithetic: bool | None = None,
    common_random_numbers: bool | None = None,
    pairs: Tensor | None = None,
) -> Energies:
    """Policy (with grad) and reference (no grad) ELBO/EUBO on shared or fresh masks (DESIGN §4.1).

    The ``None`` knobs default to ``cfg``; the same draw scores both models when common
    random numbers are on, so ``theta == ref`` gives identical terms. With ``pairs`` and
    ``algo.pair_common_masks``, the second row of each pair reuses the first row's masks,
    so positions the two completions share cancel exactly in ``L(y) - L(y')``.
    """
    models = batch.models
    cached = batch.ref_lower is not None and (not upper or batch.ref_upper is not None)
    if models.reference is None and not cached:
        raise ValueError(f"loss {cfg.name!r} needs batch.models.reference")
    span = batch.span()
    knobs = {
        "stratified": cfg.stratified if stratified is None else stratified,
        "antithetic": cfg.antithetic if antithetic is None else antithetic,
    }

    def draw() -> MaskDraw:
        return draw_masks(span, cfg, generator=models.generator, seeds=batch.mask_seeds, **knobs)

    gamma = cfg.eubo_gamma if upper else None
    shared = draw()
    if pairs is not None and cfg.pair_common_masks:
        shared = share_within_pairs(shared, pairs, span)
    lt, ut, coverage = _score(models.policy, batch, shared, cfg, gamma)
    crn = cfg.common_random_numbers if common_random_numbers is None else common_random_numbers
    cached = (
        cached and crn and knobs == {"stratified": cfg.stratified, "antithetic": cfg.antithetic}
    )
    if cached:
        assert batch.ref_lower is not None
        lr = batch.ref_lower.to(lt.dtype)
        ur = None if not upper or batch.ref_upper is None else batch.ref_upper.to(lt.dtype)
    else:
        if models.reference is None:
            raise ValueError(
                f"loss {cfg.name!r} needs batch.models.reference: the rows' cached reference "
                "energies were scored on other masks than these"
            )
        with torch.no_grad():
            fresh = shared if crn else draw_masks(span, cfg, generator=models.generator, **knobs)
            lr, ur, _ = _score(models.reference, batch, fresh, cfg, gamma)
    if cfg.length_normalize:
        n = span.sum(-1).clamp(min=1).to(lt.dtype)
        lt, lr = lt / n, lr / n
        ut = None if ut is None else ut / n
        ur = None if ur is None else ur / n
    return Energies(lt, lr, ut, ur, coverage, cached)


def share_within_pairs(draw: MaskDraw, pairs: Tensor, span: Tensor) -> MaskDraw:
    """``draw`` with row ``b`` of each pair ``(a, b)`` given row ``a``'s masks (where their
    likelihood spans agree; others keep their own): common random numbers across a pair."""
    if not len(pairs):
        return draw
    a, b = pairs[:, 0], pairs[:, 1]
    same = (span[a] == span[b]).all(-1)
    a, b = a[same], b[same]
    masks, weights = draw.masks.clone(), draw.weights.clone()
    masks[b], weights[b] = masks[a], weights[a]
    hidden = None
    if draw.hidden is not None:
        hidden = draw.hidden.clone()
        hidden[b] = hidden[a]
    return MaskDraw(masks, weights, hidden)


def _group_leaders(group_ids: Tensor) -> Tensor:
    """[M, 2] ``(first row of the group, row)`` for every other row of each group: with
    :func:`share_within_pairs`, every row of a group is scored on its first row's masks."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    rows = torch.arange(len(inv), device=inv.device)
    first = torch.full((int(inv.max()) + 1 if len(inv) else 0,), len(inv), device=inv.device)
    first = first.scatter_reduce(0, inv, rows, reduce="amin")[inv]
    keep = first != rows
    return torch.stack([first[keep], rows[keep]], dim=1)


def _pairs(batch: LossBatch) -> Tensor:
    if batch.pairs is not None:
        return batch.pairs.to(batch.rewards.device).long()
    return pair_within_groups(batch.group_ids, batch.rewards)


def _f_metrics(f: Tensor, e: Energies) -> dict[str, float]:
    fd = f.detach()
    return {
        "learner/energy_policy": float(e.lt.detach().mean()),
        "learner/energy_ref": float(e.lr.mean()),
        "learner/f_mean": float(fd.mean()),
        "learner/f_std": float(fd.std()) if fd.numel() > 1 else 0.0,
        "learner/f_abs_max": float(fd.abs().max()),
        "learner/reference_cached": float(e.reference_cached),
    }


def _pair_metrics(rewards: Tensor, pairs: Tensor) -> dict[str, float]:
    same = rewards[pairs[:, 0]] == rewards[pairs[:, 1]]
    return {
        "learner/num_pairs": float(len(pairs)),
        "learner/zero_reward_diff_share": float(same.float().mean()) if len(pairs) else 0.0,
    }


# --------------------------------------------------------------------------- EMBR losses


@register_loss("embr_e", LossTraits("embr", energy_head=True, energies=True))
def embr_e_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """EMBR-E: ``mean (L_theta - L_ref - r/beta + c_phi(x))^2`` (DESIGN §4.2, paper eq. 9).

    ``c_phi`` runs once per group (the policy's forward over the prompt alone).
    """
    from embr_rl.core.models.energy_head import prompt_offset

    head = batch.models.energy_head
    if head is None:
        raise ValueError("embr_e needs batch.models.energy_head (embr_rl.core.models.EnergyHead)")
    e = compute_energies(batch, cfg)
    r = normalize_rewards(batch.rewards, batch.group_ids, cfg.reward_norm)
    f = e.lt - e.lr - r / cfg.beta
    _, inv = torch.unique(batch.group_ids, return_inverse=True)
    rows = torch.arange(len(inv), device=inv.device)
    first = torch.full((int(inv.max()) + 1,), len(inv), device=inv.device, dtype=torch.long)
    first = first.scatter_reduce(0, inv, rows, reduce="amin")
    attn = None if batch.prompt_attention_mask is None else batch.prompt_attention_mask[first]
    c = prompt_offset(
        batch.models.policy,
        head,
        batch.prompt_ids[first],
        attn,
        detach_features=cfg.energy_head_detach,
    )[inv]
    loss = embr_e_objective(f, c.to(f.dtype))
    metrics = _f_metrics(f, e)
    metrics["learner/c_mean"] = float(c.detach().mean())
    metrics["learner/residual_std"] = float((f + c).detach().std()) if len(f) > 1 else 0.0
    return LossOutput(loss, metrics)


@register_loss("embr_c", LossTraits("embr", pairwise=True, energies=True))
def embr_c_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """EMBR-C: ``mean (f(y) - f(y'))^2`` over same-prompt pairs (DESIGN §4.2, paper eq. 13)."""
    pairs = _pairs(batch)
    e = compute_energies(batch, cfg, pairs=pairs)
    r = normalize_rewards(batch.rewards, batch.group_ids, cfg.reward_norm)
    f = e.lt - e.lr - r / cfg.beta
    metrics = _f_metrics(f, e) | _pair_metrics(batch.rewards, pairs)
    return LossOutput(embr_c_objective(f, pairs), metrics)


@register_loss("embr_u", LossTraits("embr", pairwise=True, energies=True, upper_bound=True))
def embr_u_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """EMBR-U: ``mean max(S_min^2, S_max^2)`` with ELBO/EUBO brackets (DESIGN §4.2, paper eq. 21)."""
    pairs = _pairs(batch)
    e = compute_energies(batch, cfg, upper=True, pairs=pairs)
    assert e.ut is not None and e.ur is not None and e.coverage is not None
    r = normalize_rewards(batch.rewards, batch.group_ids, cfg.reward_norm)
    dr = (r[pairs[:, 0]] - r[pairs[:, 1]]) / cfg.beta
    s_min, s_max = embr_u_bracket(e.lt, e.ut, e.lr, e.ur, dr, pairs)
    f = e.lt - e.lr - r / cfg.beta
    inverted_rows = (e.ut.detach() < e.lt.detach()).sum() + (e.ur < e.lr).sum()
    metrics = _f_metrics(f, e) | _pair_metrics(batch.rewards, pairs)
    metrics |= {
        "learner/eubo_policy": float(e.ut.detach().mean()),
        "learner/eubo_ref": float(e.ur.mean()),
        "learner/bracket_width": float((s_max - s_min).detach().mean()),
        "learner/bound_inversions": float(inverted_rows),
        "learner/bracket_inverted": float((s_max < s_min).sum()),
        "learner/smax_branch_share": float((s_max.abs() >= s_min.abs()).float().mean()),
        "learner/eubo_coverage": float(e.coverage.mean()),
    }
    return LossOutput(embr_u_objective(s_min, s_max), metrics)


# --------------------------------------------------------------------------- baselines


def d1_token_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    cfg: AlgoConfig,
    *,
    mask_id: int,
    attention_mask: Tensor | None = None,
    prompt_masks: Tensor | None = None,
) -> Tensor:
    """[B, L] d1's one-step per-token log-probs under ``cfg.masking`` (DESIGN §4.3): one forward
    per decoding block for ``block``, one fully-masked forward for ``random``.

    The learner scores the current and reference policies with it, and a rollout worker with
    ``rollout.record_logprobs`` scores the behaviour policy with it at sampling time (the
    stored ``behaviour_logp`` column), so d1's ratio on stale rows is to the policy that drew them.
    """
    kwargs = {
        "mask_id": mask_id,
        "attention_mask": attention_mask,
        "prompt_masks": prompt_masks,
        "micro_batch": cfg.micro_batch,
    }
    if _blocked(cfg):
        assert cfg.block_length is not None
        return blockwise_token_logprobs(
            model, prompt_ids, completion_ids, cfg.block_length, **kwargs
        )
    return fully_masked_token_logprobs(model, prompt_ids, completion_ids, **kwargs)


def _d1_token_logps(
    batch: LossBatch, cfg: AlgoConfig, with_ref: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Current, old and reference per-token log-probs on one shared prompt mask."""
    models = batch.models
    pmask = batch.prompt_masks
    if pmask is None:
        if batch.old_token_logp is not None:
            raise ValueError(
                "old_token_logp was given without the prompt_masks it was computed with"
            )
        pmask = sample_prompt_mask(
            batch.prompt_ids,
            cfg.prompt_mask_prob,
            attention_mask=batch.prompt_attention_mask,
            generator=models.generator,
        )

    def token_logps(model: nn.Module) -> Tensor:
        return d1_token_logprobs(
            model,
            batch.prompt_ids,
            batch.completion_ids,
            cfg,
            mask_id=models.mask_id,
            attention_mask=batch.full_attention(),
            prompt_masks=pmask,
        )

    logp = token_logps(models.policy)
    if batch.old_token_logp is not None and batch.old_token_logp.shape != logp.shape:
        raise ValueError(
            f"behaviour log-probs of shape {tuple(batch.old_token_logp.shape)} for a d1-style "
            f"loss; expected {tuple(logp.shape)} (one per completion token)"
        )
    old = batch.old_token_logp if batch.old_token_logp is not None else logp.detach()
    ref = None
    if with_ref and models.reference is not None:
        with torch.no_grad():
            ref = token_logps(models.reference)
    return logp, old.to(logp.dtype), ref


def _reference(batch: LossBatch, algo: str) -> nn.Module:
    if batch.models.reference is None:
        raise ValueError(f"{algo} with algo.kl_coef > 0 needs batch.models.reference")
    return batch.models.reference


@register_loss("d1", LossTraits("policy_gradient", one_step=True))
def d1_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """diffu-GRPO: one fully-masked forward, ``A = r - mean_group r``, token PPO clip, k3 KL (DESIGN §4.3)."""
    logp, old, ref = _d1_token_logps(batch, cfg, with_ref=cfg.kl_coef > 0)
    r = batch.rewards.to(logp.dtype)
    adv = r - group_mean(r, batch.group_ids)
    loss, stats = d1_objective(
        logp,
        old,
        ref,
        adv,
        batch.span(),
        clip_eps=cfg.clip_eps,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator or "k3",
    )
    metrics = {f"learner/{k}": float(v.detach()) for k, v in stats.items()}
    metrics["learner/adv_abs_mean"] = float(adv.abs().mean())
    m = batch.span()
    log_ratio = ((logp.detach() - old) * m).sum() / m.sum().clamp(min=1)
    metrics["learner/log_ratio_mean"] = float(log_ratio)
    metrics["learner/behaviour_logp"] = float(batch.old_token_logp is not None)
    return LossOutput(loss, metrics)


@register_loss("wd1", LossTraits("policy_gradient", one_step=True))
def wd1_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """wd1: group-softmax weighted likelihood, no ratio, no clip (DESIGN §4.3).

    ``log pi(y)`` is d1's one-step estimate: the sum (or, with ``length_normalize``, the mean)
    of fully-masked per-token log-probs over the span.
    """
    if cfg.kl_coef > 0:
        _reference(batch, "wd1")
    logp, _, ref = _d1_token_logps(batch, cfg, with_ref=cfg.kl_coef > 0)
    m = batch.span().to(logp.dtype)
    n = m.sum(-1).clamp(min=1) if cfg.length_normalize else torch.ones_like(m[:, 0])
    seq = (logp * m).sum(-1) / n
    r = batch.rewards.to(logp.dtype)
    adv = r - group_mean(r, batch.group_ids)
    loss = wd1_objective(seq, adv, batch.group_ids)
    metrics = {"learner/seq_logp_mean": float(seq.detach().mean())}
    if ref is not None:
        kl = (kl_penalty(logp, ref, cfg.kl_estimator or "k2") * m).sum(-1) / n
        loss = loss + wd1_anchor(kl, cfg.kl_coef)
        metrics["learner/kl"] = float(kl.detach().mean())
        metrics["learner/seq_logp_ref_mean"] = float(((ref * m).sum(-1) / n).mean())
    return LossOutput(loss, metrics)


def _dpo(batch: LossBatch, cfg: AlgoConfig, *, variance_reduced: bool) -> LossOutput:
    pairs = _pairs(batch)
    if variance_reduced:
        e = compute_energies(batch, cfg, stratified=True, common_random_numbers=True)
    else:
        e = compute_energies(
            batch, cfg, stratified=False, antithetic=False, common_random_numbers=False
        )
    a, b = pairs[:, 0], pairs[:, 1]
    swap = batch.rewards[a] < batch.rewards[b]
    chosen, rejected = torch.where(swap, b, a), torch.where(swap, a, b)
    weight = (batch.rewards[chosen] != batch.rewards[rejected]).to(e.lt.dtype)
    margin = e.lt - e.lr
    loss = dpo_objective(margin[chosen], margin[rejected], cfg.beta, weight)
    gap = (margin[chosen] - margin[rejected]).detach()
    metrics = _pair_metrics(batch.rewards, pairs) | {
        "learner/energy_policy": float(e.lt.detach().mean()),
        "learner/energy_ref": float(e.lr.mean()),
        "learner/dpo_margin": float(gap.mean()),
        "learner/dpo_accuracy": float(
            ((gap > 0).to(weight.dtype) * weight).sum() / weight.sum().clamp(min=1)
        ),
    }
    return LossOutput(loss, metrics)


@register_loss("dpo", LossTraits("preference", pairwise=True))
def dpo_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """DPO-ELBO with plain estimates: independent, unstratified masks for policy and ref (DESIGN §4.3)."""
    return _dpo(batch, cfg, variance_reduced=False)


@register_loss("vrpo", LossTraits("preference", pairwise=True))
def vrpo_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """VRPO: DPO-ELBO with stratified timesteps and masks shared by policy and ref (DESIGN §4.3)."""
    return _dpo(batch, cfg, variance_reduced=True)


# --------------------------------------------------------------------------- UniGRPO, SPG, BGPO


def spg_objective(
    lower: Tensor, upper: Tensor, advantages: Tensor, mix: float
) -> tuple[Tensor, Tensor]:
    """SPG's sandwiched objective (DESIGN §4.3; SPG eqs. 5 and 8) and the surrogate it used.

    ``J = mean_j [1[A_j >= 0] A_j L_ELBO(y_j) + 1[A_j < 0] A_j L~(y_j)]`` with, for negative
    advantages, ``L~ = mix * L_EUBO + (1 - mix) * L_ELBO`` (``mix = 1``: SPG w/ EUBO). When
    ``L_ELBO <= log pi <= L_EUBO`` each term is at most ``A_j log pi(y_j)``, so ``J`` lower-bounds
    the advantage-weighted log-likelihood. Returns ``(J, per-row log-likelihood surrogate)``.
    """
    negative = mix * upper + (1.0 - mix) * lower
    surrogate = torch.where(advantages >= 0, lower, negative)
    return (advantages * surrogate).mean(), surrogate


def _draw_behaviour(batch: LossBatch, logp: Tensor, algo: str) -> Tensor:
    """The old log-probs of a per-draw ratio (UniGRPO, BGPO), shaped like ``logp`` [B, n, L]."""
    if batch.old_token_logp is None:
        return logp.detach()
    if batch.mask_seeds is None:
        raise ValueError(
            f"{algo}'s recorded behaviour log-probs need batch.mask_seeds: they were scored on "
            "the rows' seeded draws"
        )
    if batch.old_token_logp.numel() != logp.numel():
        raise ValueError(
            f"{algo}'s behaviour log-probs have shape {tuple(batch.old_token_logp.shape)}; "
            f"expected {tuple(logp.shape)} (rows x algo.num_mc_samples draws x completion "
            "length, as rollout.record_logprobs scores them)"
        )
    return batch.old_token_logp.reshape(logp.shape).to(logp.dtype)


def spg_anchor(logp: Tensor, ref_logp: Tensor, masks: Tensor, scale: Tensor | float) -> Tensor:
    """Our reference anchor for SPG [B]: per draw the mean k2 ``(log pi - log pi_ref)^2 / 2``
    over its masked tokens (as UniGRPO's KL term, with no ``1/t`` weights), averaged over the
    draws and times ``scale`` (the span length: a sum over tokens, as SPG's bounds are)."""
    m = masks.to(logp.dtype)
    per_draw = (kl_penalty(logp, ref_logp, "k2") * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_draw.mean(-1) * scale


def _anchored(
    objective: Tensor,
    batch: LossBatch,
    cfg: AlgoConfig,
    draw: MaskDraw,
    logp: Tensor,
    span_len: Tensor,
    algo: str,
) -> tuple[Tensor, dict[str, float]]:
    """``objective - kl_coef * mean_j KL_j`` with :func:`spg_anchor` on the policy's draws
    (SPG, BGPO), and its metric; ``objective`` as it is when ``algo.kl_coef`` is 0."""
    if cfg.kl_coef <= 0:
        return objective, {}
    with torch.no_grad():
        ref = _draw_logprobs(_reference(batch, algo), batch, draw, cfg)
    kl = spg_anchor(logp, ref, draw.masks, 1.0 if cfg.length_normalize else span_len)
    return objective - cfg.kl_coef * kl.mean(), {"learner/kl": float(kl.detach().mean())}


def unigrpo_token_logprobs(
    batch: LossBatch, cfg: AlgoConfig, model: nn.Module
) -> tuple[Tensor, MaskDraw]:
    """[B, n, L] ``log pi(y_i | x, z_k)`` on UniGRPO's structured noising (MMaDA §2.3).

    Each of the ``algo.num_mc_samples`` draws per response masks its completion at a ratio of
    its own (``algo.timesteps``: ``count`` masks exactly ``l ~ U{1..L}`` positions, ``uniform``
    each position with probability ``t ~ U(0, 1]``), the prompt kept clean; with
    ``algo.masking=block`` inside one block, later blocks hidden, the blocks stratified over
    the draws with ``algo.stratified`` (our extension; MMaDA masks the whole completion,
    ``algo.masking=random``). Draws come from ``batch.mask_seeds`` when present, else
    ``batch.models.generator``.
    """
    draw = draw_masks(batch.span(), cfg, generator=batch.models.generator, seeds=batch.mask_seeds)
    logp = _draw_logprobs(model, batch, draw, cfg)
    return logp, draw


@register_loss("unigrpo", LossTraits("policy_gradient", fresh=True, draw_ratio=True))
def unigrpo_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """UniGRPO (MMaDA): GRPO's clipped token objective on randomly masked completions.

    ``A = (r - mean_group r) / std_group r``; per draw and masked token
    ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A) + kl_coef * k2`` (``algo.kl_estimator``), averaged over the draw's
    masked tokens (:func:`d1_objective`), then over draws and responses. ``rho`` is to the
    sampling policy on the same masks: its log-probs recorded at rollout time on the rows'
    seeded draws (``batch.old_token_logp`` [B, n, L] with ``batch.mask_seeds``, from
    ``rollout.record_logprobs``), else the current policy's, detached (exact on a fresh batch
    only); ``k2`` is to the frozen reference on the same masks.
    """
    models = batch.models
    logp, draw = unigrpo_token_logprobs(batch, cfg, models.policy)
    ref = None
    if cfg.kl_coef > 0:
        with torch.no_grad():
            ref = _draw_logprobs(_reference(batch, "unigrpo"), batch, draw, cfg)
    b, n, length = logp.shape
    old = _draw_behaviour(batch, logp, "unigrpo")
    r = batch.rewards.to(logp.dtype)
    adv = normalize_rewards(r, batch.group_ids, "scale")
    flat = logp.reshape(b * n, length)
    loss, stats = d1_objective(
        flat,
        old.reshape(b * n, length),
        None if ref is None else ref.reshape(b * n, length),
        adv.repeat_interleave(n),
        draw.masks.reshape(b * n, length),
        clip_eps=cfg.clip_eps,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator or "k2",
    )
    metrics = {f"learner/{k}": float(v.detach()) for k, v in stats.items()}
    metrics["learner/adv_abs_mean"] = float(adv.abs().mean())
    metrics["learner/mask_ratio_mean"] = float(
        (draw.masks.sum(-1) / batch.span().sum(-1, keepdim=True).clamp(min=1)).mean()
    )
    metrics["learner/behaviour_logp"] = float(batch.old_token_logp is not None)
    return LossOutput(loss, metrics)


@register_loss("spg", LossTraits("policy_gradient", upper_bound=True, fresh=True, group_masks=True))
def spg_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """SPG: maximise the ELBO of positive-advantage and minimise the EUBO (or its mixture with
    the ELBO, ``algo.spg_mix``) of negative-advantage responses, ``A = r - mean_group r``
    (:func:`spg_objective`); no ratio. Both bounds come from the
    same ``algo.num_mc_samples`` draws (block-wise with ``algo.masking=block``, SPG's choice),
    the EUBO with order ``algo.eubo_gamma`` (SPG's beta).

    With ``algo.kl_coef > 0`` (ours; SPG has no reference term) :func:`spg_anchor` ties the
    policy to the reference on the same draws: ``- kl_coef * mean_j KL_j``."""
    span = batch.span()
    draw = draw_masks(span, cfg, generator=batch.models.generator, seeds=batch.mask_seeds)
    if cfg.pair_common_masks:
        draw = share_within_pairs(draw, _group_leaders(batch.group_ids), span)
    logp = _draw_logprobs(batch.models.policy, batch, draw, cfg)
    lower = elbo_from_logprobs(logp, draw)
    upper, coverage = _eubo(logp, batch, draw, cfg, cfg.eubo_gamma, lower)
    n = span.sum(-1).clamp(min=1).to(lower.dtype)
    if cfg.length_normalize:
        lower, upper = lower / n, upper / n
    r = batch.rewards.to(lower.dtype)
    adv = r - group_mean(r, batch.group_ids)
    objective, _ = spg_objective(lower, upper, adv, cfg.spg_mix)
    objective, anchor = _anchored(objective, batch, cfg, draw, logp, n, "spg")
    metrics = {
        "learner/elbo_policy": float(lower.detach().mean()),
        "learner/eubo_policy": float(upper.detach().mean()),
        "learner/bound_inversions": float((upper.detach() < lower.detach()).sum()),
        "learner/negative_share": float((adv < 0).float().mean()),
        "learner/adv_abs_mean": float(adv.abs().mean()),
        "learner/eubo_coverage": float(coverage.mean()),
        **anchor,
    }
    return LossOutput(-objective, metrics)


def draw_elbo_terms(logp: Tensor, draw: MaskDraw) -> Tensor:
    """[B, n] one draw's ELBO term each, ``w_k sum_{i masked in z_k} log pi(y_i | x, z_k)``:
    their mean over draws is :func:`~embr_rl.core.likelihood.elbo_from_logprobs`."""
    per_draw = torch.where(draw.masks, logp, torch.zeros_like(logp)).sum(-1)
    return draw.weights.to(logp.dtype) * per_draw


def bgpo_objective(delta: Tensor, advantages: Tensor) -> Tensor:
    """Our reading of BGPO's bound (docs/objectives.md): a lower bound, linear in the draws, of
    the ELBO-ratio objective ``J = mean_j A_j exp(Delta_j)``, ``Delta_j = mean_k delta_jk``,
    ``delta_jk = l_theta,jk - l_old,jk`` (:func:`draw_elbo_terms` of policy and behaviour).

    ``A_j >= 0``: ``exp(x) >= 1 + x`` gives ``A_j (1 + mean_k delta_jk)``; ``A_j < 0``: Jensen,
    ``exp(mean_k delta_jk) <= mean_k exp(delta_jk)``, gives ``A_j mean_k exp(delta_jk)``. Each
    term depends on one draw, and at ``delta = 0`` (on-policy) value and gradient are ``J``'s.
    ``delta`` [B, n], ``advantages`` [B]; returns the scalar bound.
    """
    positive = advantages * (1.0 + delta.mean(-1))
    negative = advantages * torch.exp(delta).mean(-1)
    return torch.where(advantages >= 0, positive, negative).mean()


@register_loss("bgpo", LossTraits("policy_gradient", fresh=True, draw_ratio=True, group_masks=True))
def bgpo_loss(batch: LossBatch, cfg: AlgoConfig) -> LossOutput:
    """BGPO (our reading, docs/objectives.md): maximise :func:`bgpo_objective` with
    ``A = r - mean_group r`` on the ``algo.num_mc_samples`` draws of the rows' seeds (with
    ``algo.pair_common_masks`` a group's rows on its first row's masks, as SPG's).

    The old per-draw terms are the behaviour policy's, from its token log-probs on the same
    draws recorded at rollout time (``rollout.record_logprobs``), else the current policy's,
    detached (exact on a fresh batch only). ``algo.length_normalize`` divides each term by the
    span length. With ``algo.kl_coef > 0`` (ours) :func:`spg_anchor` ties the policy to the
    reference on the same draws, as for SPG.
    """
    span = batch.span()
    draw = draw_masks(span, cfg, generator=batch.models.generator, seeds=batch.mask_seeds)
    if cfg.pair_common_masks:
        draw = share_within_pairs(draw, _group_leaders(batch.group_ids), span)
    logp = _draw_logprobs(batch.models.policy, batch, draw, cfg)
    old = _draw_behaviour(batch, logp, "bgpo")
    n = span.sum(-1).clamp(min=1).to(logp.dtype)
    scale = n[:, None] if cfg.length_normalize else 1.0
    delta = (draw_elbo_terms(logp, draw) - draw_elbo_terms(old, draw)) / scale
    r = batch.rewards.to(logp.dtype)
    adv = r - group_mean(r, batch.group_ids)
    objective, anchor = _anchored(bgpo_objective(delta, adv), batch, cfg, draw, logp, n, "bgpo")
    metrics = {
        "learner/elbo_policy": float(draw_elbo_terms(logp.detach(), draw).mean()),
        "learner/log_ratio_mean": float(delta.detach().mean()),
        "learner/negative_share": float((adv < 0).float().mean()),
        "learner/adv_abs_mean": float(adv.abs().mean()),
        "learner/behaviour_logp": float(batch.old_token_logp is not None),
        **anchor,
    }
    return LossOutput(-objective, metrics)
