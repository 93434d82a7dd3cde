"""Estimator arithmetic on hand-made draws, spans, padding and mask reuse."""

from __future__ import annotations

import math

import pytest
import torch

from embr_rl.core.likelihood import bounds, elbo_from_logprobs, eubo_from_logprobs
from embr_rl.core.masking import MaskDraw, sample_masks, span_mask

MASK_ID = 31


def test_elbo_and_eubo_hand_values() -> None:
    logp = torch.log(torch.tensor([[[0.5, 0.25, 0.8], [0.4, 0.1, 0.9]]]))
    masks = torch.tensor([[[True, True, False], [True, False, False]]])
    draw = MaskDraw(masks, torch.tensor([[2.0, 4.0]]))
    lower = elbo_from_logprobs(logp, draw)
    assert float(lower) == pytest.approx((2 * math.log(0.5 * 0.25) + 4 * math.log(0.4)) / 2)
    upper, coverage = eubo_from_logprobs(logp, draw, gamma=2.0)
    # position 0: (2*.5^2 + 4*.4^2)/2, position 1: 2*.25^2/2; position 2 uncovered -> x 3/2
    covered = 0.5 * math.log((2 * 0.25 + 4 * 0.16) / 2) + 0.5 * math.log(2 * 0.0625 / 2)
    assert float(upper) == pytest.approx(covered * 3 / 2)
    assert float(coverage) == pytest.approx(2 / 3)
    valid = torch.tensor([[True, True, False]])
    upper, coverage = eubo_from_logprobs(logp, draw, gamma=2.0, valid=valid)
    assert float(upper) == pytest.approx(covered) and float(coverage) == 1.0


def test_span_limits_the_sums(tiny_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 30, (2, 4), generator=g)
    comp = torch.randint(2, 30, (2, 6), generator=g)
    comp[0, 3:] = 1  # EOS fill
    span = span_mask(comp, span="until_eos", eos_id=1)
    draw = sample_masks(span, 8, antithetic=True, generator=g)
    assert not draw.masks[0, :, 4:].any()
    with torch.no_grad():
        out = bounds(
            tiny_model,
            prompt,
            comp,
            mask_id=MASK_ID,
            num_samples=8,
            masks=draw,
            completion_mask=span,
        )
    assert torch.equal(out.coverage, torch.ones(2))
    assert torch.isfinite(out.elbo).all() and torch.isfinite(out.eubo).all()


def test_masks_reused_give_identical_estimates(tiny_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, 30, (3, 5), generator=g)
    attn = torch.ones(3, 5, dtype=torch.long)
    attn[0, :2] = 0
    comp = torch.randint(2, 30, (3, 7), generator=g)
    kw = {"mask_id": MASK_ID, "num_samples": 4, "attention_mask": attn}
    with torch.no_grad():
        out = bounds(tiny_model, prompt, comp, generator=g, **kw)
        again = bounds(tiny_model, prompt, comp, masks=out.draw, **kw)
        other = bounds(tiny_model, prompt, comp, generator=g, **kw)
    assert torch.equal(out.elbo, again.elbo) and torch.equal(out.eubo, again.eubo)
    assert not torch.equal(out.draw.masks, other.draw.masks)
    assert torch.isfinite(out.elbo).all() and (out.elbo < 0).all()


def test_elbo_gradient_flows(tiny_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(2, 30, (2, 3), generator=g)
    comp = torch.randint(2, 30, (2, 4), generator=g)
    value = bounds(tiny_model, prompt, comp, mask_id=MASK_ID, num_samples=2, generator=g).elbo
    value.sum().backward()
    assert tiny_model.lm_head.weight.grad.abs().sum() > 0


def test_gap_eubo_never_below_the_elbo_and_zero_width_with_one_draw_per_position() -> None:
    from embr_rl.core.masking import sample_block_masks

    g = torch.Generator().manual_seed(3)
    valid = torch.ones(4, 8, dtype=torch.bool)
    valid[0, 5:] = False
    for draws in (2, 4, 16):
        draw = sample_masks(valid, draws, scheme="count", stratified=True, generator=g)
        logp = torch.log(torch.rand(4, draws, 8, generator=g) * 0.98 + 0.01)
        upper, _ = eubo_from_logprobs(logp, draw, 1.5, valid, estimator="gap")
        assert (upper >= elbo_from_logprobs(logp, draw) - 1e-9).all()
    # One draw per block of 4: every position is scored at most once, so the gap is 0.
    draw = sample_block_masks(valid, 2, 4, scheme="count", stratified=True, generator=g)
    logp = torch.log(torch.rand(4, 2, 8, generator=g) * 0.98 + 0.01).requires_grad_()
    upper, _ = eubo_from_logprobs(logp, draw, 1.5, valid, estimator="gap")
    assert torch.allclose(upper, elbo_from_logprobs(logp, draw))
    upper.sum().backward()
    assert torch.isfinite(logp.grad).all()
    with pytest.raises(ValueError, match="'direct', 'gap'"):
        eubo_from_logprobs(logp, draw, 1.5, valid, estimator="mean")


def test_block_rescaling_matches_the_elbo_weights_so_one_draw_per_block_has_mask_only_slack() -> (
    None
):
    """With one draw per block, the direct EUBO minus the ELBO is ``sum_b L_b log(L_b/l_b)/gamma``
    (it does not depend on the model); a window-wide rescaling mixes the blocks' weights."""
    from embr_rl.core.masking import sample_block_masks

    g = torch.Generator().manual_seed(3)
    span = torch.ones(64, 12, dtype=torch.bool)
    span[:5, 9:] = False  # a shorter span: the last block holds 1 position
    draw = sample_block_masks(span, 3, 4, scheme="count", generator=g)
    gamma = 1.5
    widths = []
    for seed in (0, 1):
        logp = torch.log(torch.rand(64, 3, 12, generator=torch.Generator().manual_seed(seed)))
        upper, coverage = eubo_from_logprobs(logp, draw, gamma, span, block_length=4)
        assert (coverage < 1).any()
        widths.append(upper - elbo_from_logprobs(logp, draw))
    torch.testing.assert_close(widths[0], widths[1])
    size = torch.stack([span[:, b * 4 : (b + 1) * 4].sum(-1) for b in range(3)], 1).double()
    masked = torch.stack([draw.masks[:, b, b * 4 : (b + 1) * 4].sum(-1) for b in range(3)], 1)
    expected = (size * torch.log(size / masked.double())).sum(-1) / gamma
    torch.testing.assert_close(widths[0].double(), expected, atol=1e-4, rtol=1e-5)
    assert (widths[0] >= 0).all()
    window, _ = eubo_from_logprobs(logp, draw, gamma, span)
    assert not torch.allclose(window - elbo_from_logprobs(logp, draw), widths[1])
