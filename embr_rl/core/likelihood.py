"""Monte Carlo ELBO and EUBO of masked-diffusion likelihoods (DESIGN §4.1, paper eq. ELBO).

All ``n`` draws of a batch go through the model as ``B * n`` rows, ``micro_batch`` rows per
forward (``None``: one forward). ELBO and EUBO come from the same forwards
(:func:`bounds`), and a :class:`~embr_rl.core.masking.MaskDraw` can be passed back in to score a
second model on the same masks (common random numbers).

``model`` is anything called as ``model(input_ids=..., attention_mask=...)`` that returns an
object with ``.logits`` [B, T, V].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embr_rl.core.masking import MaskDraw, block_index, noised_inputs, sample_masks

__all__ = [
    "Bounds",
    "blockwise_token_logprobs",
    "bounds",
    "completion_logprobs",
    "elbo_from_logprobs",
    "eubo_from_logprobs",
    "fully_masked_token_logprobs",
]


@dataclass(frozen=True)
class Bounds:
    """ELBO and EUBO [B] from one set of forwards; ``coverage`` [B] is the EUBO's covered share."""

    elbo: Tensor
    eubo: Tensor
    coverage: Tensor
    draw: MaskDraw


def completion_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    masks: Tensor,
    *,
    mask_id: int,
    attention_mask: Tensor | None = None,
    prompt_masks: Tensor | None = None,
    micro_batch: int | None = None,
) -> Tensor:
    """[B, n, L]: ``log pi(y_i | x, z_k)`` at every completion position for masks [B, n, L]
    (a :class:`MaskDraw`'s ``input_masks()``: every position fed as the mask token).

    ``attention_mask`` [B, P+L] (or [B, P] for the prompt only) is repeated over draws.
    """
    b, n, length = masks.shape
    p = prompt_ids.shape[1]
    inputs = noised_inputs(prompt_ids, completion_ids, masks, mask_id, prompt_masks=prompt_masks)
    attn = None
    if attention_mask is not None:
        if attention_mask.shape[1] == p:
            attention_mask = torch.cat(
                [attention_mask, torch.ones_like(completion_ids, dtype=attention_mask.dtype)], -1
            )
        attn = attention_mask.repeat_interleave(n, dim=0)
    targets = completion_ids.repeat_interleave(n, dim=0)
    rows = inputs.shape[0]
    step = rows if micro_batch is None else max(1, micro_batch)
    out = []
    for s in range(0, rows, step):
        chunk_attn = None if attn is None else attn[s : s + step]
        logits = model(input_ids=inputs[s : s + step], attention_mask=chunk_attn).logits
        logits = logits[:, p:, :]
        if logits.dtype != torch.float64:
            logits = logits.float()
        logp = F.log_softmax(logits, dim=-1)
        out.append(logp.gather(-1, targets[s : s + step, :, None]).squeeze(-1))
    return torch.cat(out, dim=0).reshape(b, n, length)


def elbo_from_logprobs(logp: Tensor, draw: MaskDraw) -> Tensor:
    """ELBO estimate [B]: ``(1/n) sum_k w_k sum_{i masked in z_k} log pi(y_i | x, z_k)`` (DESIGN §4.1)."""
    per_draw = torch.where(draw.masks, logp, torch.zeros_like(logp)).sum(-1)
    return (draw.weights.to(logp.dtype) * per_draw).mean(-1)


def eubo_from_logprobs(
    logp: Tensor,
    draw: MaskDraw,
    gamma: float,
    valid: Tensor | None = None,
    estimator: str = "direct",
    lower: Tensor | None = None,
    block_length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """EUBO estimate [B] and coverage [B] (DESIGN §4.1).

    ``"direct"`` (SPG's tractable form):
    ``U = sum_i (1/gamma) log((1/n) sum_k w_k 1[i masked in z_k] pi(y_i | x, z_k)^gamma)``.
    ``"gap"``: ``U = L + sum_i G_i`` with ``L`` the ELBO estimate of the same draws and
    ``G_i = (1/gamma) log sum_k p_ik pi_ik^gamma - sum_k p_ik log pi_ik >= 0`` the Jensen gap
    under the self-normalised weights ``p_ik = w_k 1[i masked in z_k] / sum_j w_j 1[i masked in z_j]``;
    both forms converge to the exact EUBO as ``n`` grows, ``"gap"`` never falls below the
    ELBO, and it is 0 at a position masked in only one draw (one draw has no spread to measure).
    Positions masked in no draw are left out and the covered sum is rescaled: by
    ``L / covered`` over the window, or, with ``block_length`` (block-wise draws), by
    ``L_b / covered_b`` within each block, the within-block weight the ELBO gives the same
    draw; blocks no draw covers are filled in proportion to the covered ones.
    ``lower``: the ELBO of the same draws when the caller has it already (``"gap"`` uses it).
    """
    n = draw.num_samples
    logw = torch.log(draw.weights.to(logp.dtype))[..., None]  # [B, n, 1]
    terms = torch.where(draw.masks, logw + gamma * logp, torch.full_like(logp, -math.inf))
    if estimator == "direct":
        per_pos = (torch.logsumexp(terms, dim=1) - math.log(n)) / gamma  # [B, L]
    elif estimator == "gap":
        masked_logw = torch.where(draw.masks, logw, torch.full_like(logp, -math.inf))
        log_norm = torch.logsumexp(masked_logw, dim=1, keepdim=True)  # [B, 1, L]
        p = torch.exp(masked_logw - log_norm).nan_to_num(0.0)  # [B, n, L], 0 off the masks
        geometric = (p * torch.where(draw.masks, logp, torch.zeros_like(logp))).sum(1)
        power = (torch.logsumexp(terms, dim=1) - log_norm.squeeze(1)) / gamma
        per_pos = power - geometric
    else:
        raise ValueError(f"unknown EUBO estimator {estimator!r}; allowed: 'direct', 'gap'")
    covered = draw.covered()
    span = torch.ones_like(covered) if valid is None else valid.bool()
    covered = covered & span
    total = _rescaled_sum(
        torch.where(covered, per_pos, torch.zeros_like(per_pos)), covered, span, block_length
    )
    n_valid = span.sum(-1).to(logp.dtype)
    n_cov = covered.sum(-1).to(logp.dtype)
    coverage = torch.where(n_valid > 0, n_cov / n_valid.clamp(min=1.0), torch.ones_like(n_cov))
    if estimator == "gap":
        lower = elbo_from_logprobs(logp, draw) if lower is None else lower
        return lower + total.clamp(min=0.0), coverage
    return total, coverage


def _rescaled_sum(
    values: Tensor, covered: Tensor, span: Tensor, block_length: int | None
) -> Tensor:
    """[B] ``sum_s (span_s / covered_s) sum_{i covered in s} values_i`` over strata ``s`` (the
    blocks, or the whole window), times ``span / span of the covered strata``."""
    b, length = values.shape
    if block_length is None or length == 0:
        strata = torch.zeros(length, dtype=torch.long, device=values.device)
    else:
        strata = block_index(length, block_length, values.device)
    n_strata = int(strata.max()) + 1 if length else 1

    def per_stratum(x: Tensor) -> Tensor:
        out = torch.zeros(b, n_strata, dtype=values.dtype, device=values.device)
        return out.index_add(1, strata, x.to(values.dtype))

    tot, cov, val = per_stratum(values), per_stratum(covered), per_stratum(span)
    hit = cov > 0
    est = torch.where(hit, tot * val / cov.clamp(min=1.0), torch.zeros_like(tot)).sum(-1)
    val_hit = torch.where(hit, val, torch.zeros_like(val)).sum(-1)
    scale = torch.where(val_hit > 0, val.sum(-1) / val_hit.clamp(min=1.0), torch.zeros_like(est))
    return est * scale


def _draw(
    prompt_ids: Tensor,
    completion_ids: Tensor,
    *,
    num_samples: int,
    completion_mask: Tensor | None,
    generator: torch.Generator | None,
    masks: MaskDraw | None,
    scheme: str,
    stratified: bool,
    antithetic: bool,
) -> tuple[MaskDraw, Tensor]:
    valid = (
        torch.ones_like(completion_ids, dtype=torch.bool)
        if completion_mask is None
        else completion_mask.bool()
    )
    if masks is None:
        masks = sample_masks(
            valid,
            num_samples,
            scheme=scheme,
            stratified=stratified,
            antithetic=antithetic,
            generator=generator,
        )
    return masks.to(completion_ids.device), valid


def bounds(
    model: nn.Module,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    *,
    mask_id: int,
    num_samples: int,
    gamma: float = 1.5,
    attention_mask: Tensor | None = None,
    completion_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    masks: MaskDraw | None = None,
    scheme: str = "count",
    stratified: bool = True,
    antithetic: bool = False,
    micro_batch: int | None = None,
    estimator: str = "direct",
) -> Bounds:
    """ELBO and EUBO [B] of ``completion_ids`` given ``prompt_ids`` from one set of forwards
    (DESIGN §4.1: ELBO with ``w(t) = 1/t``; EUBO with exponent ``gamma >= 1``, paper §4.3).

    Sums run over the positions selected by ``completion_mask`` (default: all). Pass
    ``masks`` (a previous ``Bounds.draw``) to reuse the same draws for another model. The
    defaults are the config's (``algo.timesteps``, ``stratified``, ``antithetic``,
    ``eubo_gamma``, ``eubo_estimator``); the losses call the same pieces on their own draws.
    """
    draw, valid = _draw(
        prompt_ids,
        completion_ids,
        num_samples=num_samples,
        completion_mask=completion_mask,
        generator=generator,
        masks=masks,
        scheme=scheme,
        stratified=stratified,
        antithetic=antithetic,
    )
    logp = completion_logprobs(
        model,
        prompt_ids,
        completion_ids,
        draw.input_masks(),
        mask_id=mask_id,
        attention_mask=attention_mask,
        micro_batch=micro_batch,
    )
    lower = elbo_from_logprobs(logp, draw)
    upper, coverage = eubo_from_logprobs(logp, draw, gamma, valid, estimator, lower)
    return Bounds(lower, upper, coverage, draw)


def fully_masked_token_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    *,
    mask_id: int,
    attention_mask: Tensor | None = None,
    prompt_masks: Tensor | None = None,
    micro_batch: int | None = None,
) -> Tensor:
    """[B, L] per-token ``log pi(y_i | x', all of y masked)`` from one forward (d1, DESIGN §4.3).

    ``prompt_masks`` [B, P] masks prompt tokens (shared by old, reference and current policy).
    """
    masks = torch.ones(completion_ids.shape[0], 1, completion_ids.shape[1], dtype=torch.bool)
    return completion_logprobs(
        model,
        prompt_ids,
        completion_ids,
        masks.to(completion_ids.device),
        mask_id=mask_id,
        attention_mask=attention_mask,
        prompt_masks=prompt_masks,
        micro_batch=micro_batch,
    )[:, 0, :]


def blockwise_token_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    block_length: int,
    *,
    mask_id: int,
    attention_mask: Tensor | None = None,
    prompt_masks: Tensor | None = None,
    micro_batch: int | None = None,
) -> Tensor:
    """[B, L] d1's one-step estimate per decoding block: ``log pi(y_i | x', y_<b, y_>=b masked)``
    for ``i`` in block ``b`` (DESIGN §4.3 with §5's blocks).

    One forward per block (``ceil(L / block_length)`` rows per sequence): the state the
    semi-autoregressive sampler is in when it starts block ``b``. With one block covering the
    window this is :func:`fully_masked_token_logprobs`.
    """
    b, length = completion_ids.shape
    blk = block_index(length, block_length, completion_ids.device)
    n_blocks = int(blk.max()) + 1
    ids = torch.arange(n_blocks, device=completion_ids.device)
    masks = (blk[None, :] >= ids[:, None])[None].expand(b, n_blocks, length)
    logp = completion_logprobs(
        model,
        prompt_ids,
        completion_ids,
        masks,
        mask_id=mask_id,
        attention_mask=attention_mask,
        prompt_masks=prompt_masks,
        micro_batch=micro_batch,
    )
    return logp.gather(1, blk[None, None, :].expand(b, 1, length)).squeeze(1)
