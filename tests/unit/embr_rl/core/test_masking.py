"""The forward process: which positions are masked, with which weights, how draws are paired."""

from __future__ import annotations

import math

import pytest
import torch

from embr_rl.core.masking import (
    noised_inputs,
    sample_masks,
    sample_prompt_mask,
    sample_unit,
    span_mask,
    stop_id_set,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_stratified_times_fall_in_their_strata() -> None:
    v, partner = sample_unit(500, 5, stratified=True, generator=_gen())
    k = torch.arange(5)
    assert ((v > k / 5) & (v <= (k + 1) / 5)).all()
    assert not partner.any()


@pytest.mark.parametrize("scheme", ["uniform", "count"])
def test_masks_only_touch_valid_positions(scheme: str) -> None:
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [False] * 6])
    draw = sample_masks(valid, 64, scheme=scheme, generator=_gen())
    assert draw.masks.shape == (3, 64, 6)
    assert not (draw.masks & ~valid[:, None, :]).any()
    assert (draw.weights[2] == 0).all()


def test_uniform_marginal_rate_is_one_half() -> None:
    # E[t] = 1/2, so every position is masked with probability 1/2 overall.
    n_draws, length = 20000, 4
    draw = sample_masks(torch.ones(1, length, dtype=torch.bool), n_draws, generator=_gen(1))
    rate = draw.masks.double().mean(1)[0]
    se = math.sqrt(0.25 / n_draws)
    assert ((rate - 0.5).abs() < 5 * se).all()


def test_uniform_keeps_empty_draws() -> None:
    # L = 1: a draw masks nothing with probability E[1 - t] = 1/2, and it is not resampled.
    n_draws = 20000
    draw = sample_masks(torch.ones(1, 1, dtype=torch.bool), n_draws, generator=_gen(2))
    empty = (~draw.masks.any(-1)).double().mean()
    assert abs(float(empty) - 0.5) < 5 * math.sqrt(0.25 / n_draws)
    # each mask is drawn at its weight's time: P(masked | t) = t = 1/w
    t = 1.0 / draw.weights[0]
    assert abs(float((draw.masks[0, :, 0].double() - t).mean())) < 5 * math.sqrt(0.25 / n_draws)


@pytest.mark.parametrize("stratified", [False, True])
def test_uniform_antithetic_pairs_are_complements(stratified: bool) -> None:
    valid = torch.tensor([[True] * 5 + [False] * 2])
    draw = sample_masks(valid, 7, antithetic=True, stratified=stratified, generator=_gen(3))
    a, b = draw.masks[:, 0:6:2], draw.masks[:, 1:6:2]
    assert torch.equal(b, valid[:, None, :] & ~a)
    t_a, t_b = 1 / draw.weights[:, 0:6:2], 1 / draw.weights[:, 1:6:2]
    assert torch.allclose(t_a + t_b, torch.ones_like(t_a))
    assert draw.covered()[valid].all()


def test_count_sizes_uniform_and_weights() -> None:
    length, n_draws = 5, 20000
    draw = sample_masks(
        torch.ones(1, length, dtype=torch.bool), n_draws, scheme="count", generator=_gen(4)
    )
    size = draw.masks.sum(-1)[0]
    assert torch.allclose(draw.weights[0], length / size.float())
    freq = torch.bincount(size, minlength=length + 1)[1:].double() / n_draws
    se = math.sqrt(0.2 * 0.8 / n_draws)
    assert ((freq - 1 / length).abs() < 5 * se).all()
    assert (size >= 1).all()


@pytest.mark.parametrize("stratified", [False, True])
def test_count_antithetic_pairs_cover_with_one_overlap(stratified: bool) -> None:
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    draw = sample_masks(
        valid, 8, scheme="count", antithetic=True, stratified=stratified, generator=_gen(5)
    )
    a, b = draw.masks[:, 0::2], draw.masks[:, 1::2]
    n_valid = valid.sum(-1)[:, None]
    assert torch.equal(a | b, valid[:, None, :].expand_as(a))
    assert ((a & b).sum(-1) == 1).all()
    assert (a.sum(-1) + b.sum(-1) == n_valid + 1).all()
    assert torch.allclose(draw.weights[:, 1::2], n_valid / b.sum(-1).float())


def test_count_stratified_sizes_follow_strata() -> None:
    draw = sample_masks(
        torch.ones(50, 4, dtype=torch.bool), 4, scheme="count", stratified=True, generator=_gen(6)
    )
    # four strata over l in {1..4}: draw k masks exactly k + 1 positions
    assert torch.equal(draw.masks.sum(-1), torch.arange(1, 5).expand(50, 4))


def test_seeded_draws_repeat() -> None:
    valid = torch.ones(3, 6, dtype=torch.bool)
    a = sample_masks(valid, 4, generator=_gen(7))
    b = sample_masks(valid, 4, generator=_gen(7))
    c = sample_masks(valid, 4, generator=_gen(8))
    assert torch.equal(a.masks, b.masks) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)


def test_noised_inputs_leave_prompt_clean() -> None:
    prompt = torch.tensor([[5, 6, 7]])
    comp = torch.tensor([[1, 2, 3, 4]])
    masks = torch.tensor([[[True, False, True, False], [False, False, False, True]]])
    out = noised_inputs(prompt, comp, masks, 9)
    assert out.tolist() == [[5, 6, 7, 9, 2, 9, 4], [5, 6, 7, 1, 2, 3, 9]]
    pm = torch.tensor([[False, True, False]])
    out = noised_inputs(prompt, comp, masks, 9, prompt_masks=pm)
    assert out[:, :3].tolist() == [[5, 9, 7], [5, 9, 7]]


def test_prompt_mask_rate_and_padding() -> None:
    prompt = torch.zeros(400, 50, dtype=torch.long)
    attn = torch.ones_like(prompt, dtype=torch.bool)
    attn[:, :10] = False
    m = sample_prompt_mask(prompt, 0.15, attention_mask=attn, generator=_gen(9))
    assert not m[:, :10].any()
    n = 400 * 40
    assert abs(float(m[:, 10:].double().mean()) - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n)


def test_span_mask_until_eos() -> None:
    ids = torch.tensor([[4, 5, 1, 1, 1], [4, 5, 6, 7, 8]])
    assert span_mask(ids).all()
    got = span_mask(ids, span="until_eos", eos_id=1)
    assert got.tolist() == [[True, True, True, False, False], [True] * 5]


def test_span_mask_until_eos_ends_at_the_first_stop_id() -> None:
    # 9 stands for an end-of-turn id (<|eot_id|>), 1 for the EOS.
    ids = torch.tensor([[4, 9, 1, 1, 1], [4, 5, 1, 9, 1], [4, 5, 6, 7, 8], [9, 9, 9, 9, 9]])
    got = span_mask(ids, span="until_eos", eos_id=1, stop_ids=[9])
    assert got.tolist() == [
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True] * 5,
        [True, False, False, False, False],
    ]
    # The EOS alone: row 0's <eot> is an ordinary token and row 3 never ends.
    assert span_mask(ids, span="until_eos", eos_id=1)[[0, 3]].tolist() == [
        [True, True, True, False, False],
        [True] * 5,
    ]
    assert torch.equal(span_mask(ids, span="until_eos", stop_ids=[1, 9]), got)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[2, 3:] = False
    padded = span_mask(ids, span="until_eos", eos_id=1, stop_ids=[9], valid=valid)
    assert padded[2].tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="needs eos_id or stop_ids"):
        span_mask(ids, span="until_eos")
    assert stop_id_set(1, [9, 1, 4]) == (1, 9, 4) and stop_id_set(None, None) == ()


def test_block_masks_follow_the_block_sampler() -> None:
    from embr_rl.core.masking import block_index, sample_block_masks

    span = torch.ones(3, 12, dtype=torch.bool)
    span[2, 7:] = False  # an until_eos span: only two blocks of four positions hold it
    blk = block_index(12, 4)
    g = torch.Generator().manual_seed(1)
    total = torch.zeros(3, 12, dtype=torch.float64)
    n_rep = 3000
    for _ in range(n_rep):
        d = sample_block_masks(span, 3, 4, generator=g)
        scored = d.masks.any(-1)
        assert scored.all()  # every draw scores some position of its block
        for row in range(3):
            for k in range(3):
                chosen = int(blk[d.masks[row, k]].max())
                assert (blk[d.masks[row, k]] == chosen).all()  # one block per draw
                assert torch.equal(d.hidden[row, k], blk > chosen)  # later blocks hidden
                assert not (d.masks[row, k] & ~span[row]).any()
        total += (d.weights[..., None].double() * d.masks).mean(1)
    mean = total / n_rep
    # E[w 1[i masked]] = 1 on the span (unbiased block ELBO), 0 elsewhere
    assert torch.allclose(mean[span], torch.ones(int(span.sum()), dtype=torch.float64), atol=0.06)
    assert (mean[~span] == 0).all()


@pytest.mark.parametrize("scheme", ["count", "uniform"])
def test_antithetic_block_masks_pair_up_within_a_block_and_stay_unbiased(scheme: str) -> None:
    from embr_rl.core.masking import block_index, sample_block_masks

    span = torch.ones(3, 12, dtype=torch.bool)
    span[2, 7:] = False
    blk = block_index(12, 4)
    g = torch.Generator().manual_seed(3)
    total = torch.zeros(3, 12, dtype=torch.float64)
    n_rep = 3000
    for _ in range(n_rep):
        d = sample_block_masks(span, 5, 4, scheme=scheme, antithetic=True, generator=g)
        for row in range(3):
            for j in range(2):  # pairs (0, 1), (2, 3); draw 4 is unpaired
                a, c = d.masks[row, 2 * j], d.masks[row, 2 * j + 1]
                both = a | c
                block = int(blk[both].max())
                assert (blk[both] == block).all()  # one block for the pair
                assert torch.equal(d.hidden[row, 2 * j], d.hidden[row, 2 * j + 1])
                assert torch.equal(both, (blk == block) & span[row])  # it covers the block
        total += (d.weights[..., None].double() * d.masks).mean(1)
    mean = total / n_rep
    # "uniform" weights 1/t have infinite variance (the reason "count" is the default).
    tol = 0.07 if scheme == "count" else 0.15
    assert torch.allclose(mean[span], torch.ones(int(span.sum()), dtype=torch.float64), atol=tol)
    assert (mean[~span] == 0).all()


def test_block_masks_stratify_over_blocks() -> None:
    from embr_rl.core.masking import block_index, sample_block_masks

    span = torch.ones(5, 32, dtype=torch.bool)
    d = sample_block_masks(span, 4, 8, generator=torch.Generator().manual_seed(0))
    blk = block_index(32, 8)
    chosen = torch.stack([blk[d.masks[r, k]].max() for r in range(5) for k in range(4)]).view(5, 4)
    assert (chosen == torch.arange(4)).all()  # four stratified draws: each block once
