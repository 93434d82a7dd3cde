"""The masked-diffusion forward process on completion positions (DESIGN §4.1, paper eq. FWD).

A :class:`MaskDraw` holds ``n`` Monte Carlo masks per sequence and the weight of each draw
(``1/t`` for the ``uniform`` time variant, ``L/l`` for the ``count`` variant). One draw can
be reused for several models (common random numbers). Prompts stay clean; the d1 baseline
can mask prompt tokens with :func:`sample_prompt_mask`.

Both variants give the same expectation: for a position ``i`` the weighted indicator
``w * 1[i masked]`` averages over contexts in which the number of *other* masked positions
is uniform on ``{0..L-1}`` and the masked set is uniform given its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MaskDraw",
    "block_index",
    "noised_inputs",
    "sample_block_masks",
    "sample_masks",
    "sample_prompt_mask",
    "sample_unit",
    "span_mask",
    "stop_id_set",
]


@dataclass(frozen=True)
class MaskDraw:
    """``n`` masks per sequence. ``masks`` [B, n, L] bool (True = masked and scored);
    ``weights`` [B, n]; ``hidden`` [B, n, L] (optional): positions also masked in the model's
    input but not scored (the blocks after the scored one, :func:`sample_block_masks`)."""

    masks: Tensor
    weights: Tensor
    hidden: Tensor | None = None

    def input_masks(self) -> Tensor:
        """[B, n, L] every position the model sees as the mask token."""
        return self.masks if self.hidden is None else self.masks | self.hidden

    @property
    def num_samples(self) -> int:
        return int(self.masks.shape[1])

    def covered(self) -> Tensor:
        """[B, L] bool: positions masked in at least one draw."""
        return self.masks.any(dim=1)

    def to(self, device: torch.device | str) -> MaskDraw:
        hidden = None if self.hidden is None else self.hidden.to(device)
        return MaskDraw(self.masks.to(device), self.weights.to(device), hidden)


def _rand(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_unit(
    batch_size: int,
    num_samples: int,
    *,
    stratified: bool = False,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Base uniforms ``v`` [B, n] in (0, 1] and the antithetic-partner flag [B, n] (bool).

    Stratified: ``v_k = (k - 1 + u_k)/m`` over the ``m`` independent slots (DESIGN §4.1).
    Antithetic: slots come in pairs ``(2j, 2j+1)``; the second of a pair is flagged and is
    derived from the first by the sampler (complementary mask). With odd ``n`` and
    antithetic on, the last draw is an unpaired, unstratified one.
    """
    device = torch.device(device)
    pairs = num_samples // 2 if antithetic else 0
    slots = pairs if antithetic else num_samples
    u = 1.0 - _rand((batch_size, max(slots, 1)), generator, device)  # (0, 1]
    if stratified and slots > 0:
        k = torch.arange(slots, device=device, dtype=u.dtype)
        u = (k + u) / slots
    u = u[:, :slots]
    partner = torch.zeros(batch_size, num_samples, dtype=torch.bool, device=device)
    if not antithetic:
        return u, partner
    v = u.repeat_interleave(2, dim=1)
    partner[:, 1 : 2 * pairs : 2] = True
    if num_samples % 2:
        extra = 1.0 - _rand((batch_size, 1), generator, device)
        v = torch.cat([v, extra], dim=1)
    return v, partner


def sample_masks(
    completion_mask: Tensor,
    num_samples: int,
    *,
    scheme: str = "uniform",
    stratified: bool = False,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
) -> MaskDraw:
    """Draw ``n`` masks over the valid completion positions (DESIGN §4.1).

    ``completion_mask`` [B, L] bool selects the positions that may be masked (the
    likelihood span). ``scheme="uniform"``: ``t ~ U(0, 1]``, each position masked with
    probability ``t``, weight ``1/t``; the antithetic partner is the complement (time
    ``1 - t``, weight ``1/(1-t)``). ``scheme="count"``: ``l ~ U{1..L}``, exactly ``l``
    positions masked (uniform subset), weight ``L/l``; the partner masks the last
    ``L - l + 1`` positions of the same random order (size uniform on ``{1..L}``, and the
    pair covers every position). A draw that masks nothing keeps weight with zero
    contribution (never resampled).
    """
    if scheme not in ("uniform", "count"):
        raise ValueError(f"scheme must be 'uniform' or 'count', got {scheme!r}")
    valid = completion_mask.bool()
    device = valid.device
    b, length = valid.shape
    v, partner = sample_unit(
        b,
        num_samples,
        stratified=stratified,
        antithetic=antithetic,
        generator=generator,
        device=device,
    )
    noise = _rand((b, num_samples, length), generator, device)
    valid3 = valid[:, None, :]
    if scheme == "uniform":
        t = torch.where(partner, 1.0 - v, v)
        first = (noise < v[..., None]) & valid3
        # A partner's mask is the complement of the draw before it.
        prev = torch.roll(first, shifts=1, dims=1)
        masks = torch.where(partner[..., None], valid3 & ~prev, first)
        usable = (t > 0) & valid.any(-1, keepdim=True)
        weights = torch.where(usable, 1.0 / t.clamp(min=torch.finfo(t.dtype).tiny), 0.0)
        return MaskDraw(masks, weights)
    n_valid = valid.sum(-1, keepdim=True).to(v.dtype)  # [B, 1]
    count = torch.ceil(v * n_valid).clamp(min=1.0)
    scores = torch.where(valid3, noise, torch.full_like(noise, 2.0))
    if antithetic:
        # The partner reuses the order of the draw before it.
        scores = torch.where(partner[..., None], torch.roll(scores, shifts=1, dims=1), scores)
    ranks = scores.argsort(dim=-1).argsort(dim=-1).to(v.dtype)
    first = (ranks < count[..., None]) & valid3
    second = (ranks >= count[..., None] - 1) & valid3
    masks = torch.where(partner[..., None], second, first)
    size = torch.where(partner, n_valid - count + 1, count)
    weights = torch.where(n_valid > 0, n_valid / size.clamp(min=1.0), 0.0)
    return MaskDraw(masks, weights)


def sample_prompt_mask(
    prompt_ids: Tensor,
    prob: float,
    *,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[B, P] bool: real prompt tokens masked independently with probability ``prob`` (d1, DESIGN §4.3)."""
    noise = _rand(tuple(prompt_ids.shape), generator, prompt_ids.device)
    masked = noise < prob
    if attention_mask is not None:
        masked &= attention_mask.bool()
    return masked


def noised_inputs(
    prompt_ids: Tensor,
    completion_ids: Tensor,
    masks: Tensor,
    mask_id: int,
    *,
    prompt_masks: Tensor | None = None,
) -> Tensor:
    """[B*n, P+L] model inputs: prompt (optionally masked) + completion with ``masks`` [B, n, L] applied."""
    b, n, _ = masks.shape
    comp = completion_ids[:, None, :].expand(b, n, -1)
    comp = torch.where(masks, torch.full_like(comp, mask_id), comp)
    prompt = prompt_ids
    if prompt_masks is not None:
        prompt = torch.where(prompt_masks, torch.full_like(prompt, mask_id), prompt)
    prompt = prompt[:, None, :].expand(b, n, -1)
    return torch.cat([prompt, comp], dim=-1).reshape(b * n, -1)


def stop_id_set(eos_id: int | None, stop_ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """The ids that end a completion: ``eos_id`` (if any) first, then ``stop_ids``, each once."""
    ids = [] if eos_id is None else [int(eos_id)]
    ids.extend(int(i) for i in stop_ids or ())
    return tuple(dict.fromkeys(ids))


def span_mask(
    completion_ids: Tensor,
    *,
    span: str = "window",
    eos_id: int | None = None,
    stop_ids: Sequence[int] | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """[B, L] bool likelihood span (DESIGN §4.1).

    ``window``: every generated position (the trailing EOS fill included). ``until_eos``:
    positions up to and including the first stop id (the d1 convention), the stop ids
    being ``eos_id`` and ``stop_ids`` (e.g. LLaDA's ``<|eot_id|>``). ``valid`` optionally
    excludes padding.
    """
    mask = (
        torch.ones_like(completion_ids, dtype=torch.bool) if valid is None else valid.bool().clone()
    )
    if span == "window":
        return mask
    if span != "until_eos":
        raise ValueError(f"span must be 'window' or 'until_eos', got {span!r}")
    stops = stop_id_set(eos_id, stop_ids)
    if not stops:
        raise ValueError("span='until_eos' needs eos_id or stop_ids")
    table = torch.tensor(stops, dtype=completion_ids.dtype, device=completion_ids.device)
    is_stop = torch.isin(completion_ids, table).long()
    before = (is_stop.cumsum(-1) - is_stop) == 0
    return mask & before


def block_index(length: int, block_length: int, device: torch.device | str = "cpu") -> Tensor:
    """[L] the decoding block of each completion position (DESIGN §5: blocks left to right)."""
    return torch.arange(length, device=device) // block_length


def sample_block_masks(
    completion_mask: Tensor,
    num_samples: int,
    block_length: int,
    *,
    scheme: str = "count",
    stratified: bool = True,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
) -> MaskDraw:
    """Masks that follow semi-autoregressive block decoding (DESIGN §4.1, SPG's block-wise masking).

    The sampler decodes blocks of ``block_length`` left to right, so ``log pi(y|x)`` is
    ``sum_b log pi(y_b | x, y_<b)`` with every later block still masked. Each draw picks a
    block ``b`` (uniform over the blocks that hold span positions, stratified over the
    draws), leaves the blocks before it clean, hides every later block (``hidden``: masked,
    not scored) and masks positions of ``b`` by ``scheme`` within the block. The weight is
    ``num_blocks * w_within``, so ``E[w 1[i masked]] = 1`` for every span position and the
    estimate is unbiased for ``sum_b ELBO(y_b | x, y_<b)``, a lower bound of the block
    sampler's log-likelihood. With ``num_samples`` a multiple of the block count and
    ``stratified``, every block is scored equally often. ``antithetic``: draws come in pairs
    ``(2j, 2j+1)`` on the same block, the second masking the complement of the first within
    it (:func:`sample_masks`' partner, so the pair covers every position of the block; each
    draw's marginal, hence the unbiasedness, is unchanged); stratification is over the pairs.
    """
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    valid = completion_mask.bool()
    device = valid.device
    b, length = valid.shape
    blk = block_index(length, block_length, device)  # [L]
    n_blocks = int(blk.max()) + 1 if length else 0
    has = torch.zeros(b, max(n_blocks, 1), dtype=torch.bool, device=device)
    if length:
        has = has.index_put(
            (torch.arange(b, device=device)[:, None], blk[None, :]), valid, accumulate=True
        )
    n_live = has.sum(-1, keepdim=True)  # [B, 1]; span blocks are a prefix only for window spans
    v, partner = sample_unit(
        b,
        num_samples,
        stratified=stratified,
        antithetic=antithetic,
        generator=generator,
        device=device,
    )
    rank = torch.floor(v * n_live.to(v.dtype)).clamp(max=n_live.to(v.dtype) - 1).clamp(min=0).long()
    # The rank-th block that holds span positions, for each draw.
    order = torch.cumsum(has.long(), dim=-1) - 1  # [B, nb]: rank of each live block
    match = (order[:, None, :] == rank[..., None]) & has[:, None, :]  # [B, n, nb]
    chosen = match.float().argmax(-1)  # [B, n]
    in_block = valid[:, None, :] & (blk[None, None, :] == chosen[..., None])  # [B, n, L]
    pairs = int(partner.sum(-1).max()) if b else 0
    if pairs:
        # Pair j's two draws share a block (same base uniform): one antithetic inner draw each.
        first = in_block[:, 0 : 2 * pairs : 2].reshape(b * pairs, length)
        inner = sample_masks(first, 2, scheme=scheme, antithetic=True, generator=generator)
        masks = inner.masks.reshape(b, 2 * pairs, length)
        weights = inner.weights.reshape(b, 2 * pairs)
        if num_samples > 2 * pairs:
            last = sample_masks(in_block[:, -1], 1, scheme=scheme, generator=generator)
            masks = torch.cat([masks, last.masks], dim=1)
            weights = torch.cat([weights, last.weights], dim=1)
    else:
        inner = sample_masks(
            in_block.reshape(b * num_samples, length), 1, scheme=scheme, generator=generator
        )
        masks = inner.masks.reshape(b, num_samples, length)
        weights = inner.weights.reshape(b, num_samples)
    weights = weights * n_live.to(weights.dtype)
    hidden = blk[None, None, :] > chosen[..., None]
    return MaskDraw(masks, weights, hidden.expand(b, num_samples, length).clone())
