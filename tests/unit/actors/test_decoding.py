"""Confidence-based decoding: schedule, invariants and argument checks."""

from __future__ import annotations

import pytest
import torch

from actors.decoding import DecodeStats, generate, num_transfer_tokens
from tests.conftest import TINY_MASK_ID


def test_transfer_schedule_even_split_remainder_first() -> None:
    masked = torch.tensor([[True] * 7 + [False], [True] * 8])
    sched = num_transfer_tokens(masked, 3)
    assert sched.tolist() == [[3, 2, 2], [3, 3, 2]]
    assert sched.sum(1).tolist() == [7, 8]


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])  # row 0 is left-padded
    return ids, torch.tensor([[0, 0, 1, 1, 1], [1] * 5])


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_fills_every_position_and_keeps_prompt(
    tiny_model, remasking: str, temperature: float
) -> None:
    ids, mask = _prompts()
    stats = DecodeStats()
    out = generate(
        tiny_model,
        ids,
        mask,
        gen_length=8,
        block_length=4,
        steps=4,
        mask_id=TINY_MASK_ID,
        temperature=temperature,
        remasking=remasking,
        generator=torch.Generator().manual_seed(0),
        stats=stats,
    )
    assert out.shape == (2, 13)
    assert torch.equal(out[:, :5], ids)
    assert not (out == TINY_MASK_ID).any()
    assert stats.forward_passes == 4 and stats.tokens_committed == 16


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(tiny_model) -> None:
    ids, mask = _prompts()
    kw = dict(gen_length=8, block_length=8, steps=8, mask_id=TINY_MASK_ID)
    assert torch.equal(generate(tiny_model, ids, mask, **kw), generate(tiny_model, ids, mask, **kw))
    s1 = generate(
        tiny_model, ids, mask, temperature=1.0, generator=torch.Generator().manual_seed(3), **kw
    )
    s2 = generate(
        tiny_model, ids, mask, temperature=1.0, generator=torch.Generator().manual_seed(3), **kw
    )
    assert torch.equal(s1, s2)


def test_one_step_per_token_commits_the_most_confident_first(tiny_model) -> None:
    ids, mask = _prompts()
    out = generate(
        tiny_model, ids[:1], mask[:1], gen_length=4, block_length=4, steps=4, mask_id=TINY_MASK_ID
    )
    x = torch.cat([ids[:1], torch.full((1, 4), TINY_MASK_ID)], dim=1)
    full = torch.cat([mask[:1], torch.ones(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        probs = tiny_model(input_ids=x, attention_mask=full).logits.softmax(-1)[0, 5:]
    conf, tokens = probs.max(-1)
    first = int(conf.argmax())
    assert out[0, 5 + first] == tokens[first]


def test_threshold_mode_uses_fewer_forwards_with_low_threshold(tiny_model) -> None:
    ids, mask = _prompts()
    stats = DecodeStats()
    out = generate(
        tiny_model,
        ids,
        mask,
        gen_length=8,
        block_length=8,
        steps=8,
        mask_id=TINY_MASK_ID,
        threshold=1e-9,
        stats=stats,
    )
    assert stats.forward_passes == 1 and not (out == TINY_MASK_ID).any()


def test_suppress_eos_never_emits_eos(tiny_model) -> None:
    ids, mask = _prompts()
    out = generate(
        tiny_model,
        ids,
        mask,
        gen_length=8,
        block_length=4,
        steps=8,
        mask_id=TINY_MASK_ID,
        temperature=1.0,
        eos_id=1,
        suppress_eos=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert not (out[:, 5:] == 1).any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gen_length=10, block_length=4, steps=4), "divisible by block_length"),
        (dict(gen_length=8, block_length=4, steps=3), "number of blocks"),
        (dict(gen_length=8, block_length=4, steps=4, mask_id=99), "outside the vocabulary"),
        (
            dict(gen_length=8, block_length=4, steps=4, remasking="entropy"),
            "allowed: low_confidence, random",
        ),
        (dict(gen_length=8, block_length=4, steps=4, threshold=0.0), "threshold"),
        (dict(gen_length=8, block_length=4, steps=4, suppress_eos=True), "eos_id"),
    ],
)
def test_invalid_arguments_raise_clear_errors(tiny_model, kwargs: dict, match: str) -> None:
    ids, mask = _prompts()
    kwargs.setdefault("mask_id", TINY_MASK_ID)
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, ids, mask, **kwargs)
