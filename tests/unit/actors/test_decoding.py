"""Confidence-based decoding: schedule, invariants and argument checks."""

from __future__ import annotations

import warnings

import pytest
import torch

from actors.decoding import DecodeStats, generate, num_transfer_tokens
from tests.conftest import TINY_MASK_ID, TINY_VOCAB, build_tiny_model


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
        (dict(gen_length=8, block_length=4, steps=4, suppress_eos=True), "eos_id or stop_ids"),
    ],
)
def test_invalid_arguments_raise_clear_errors(tiny_model, kwargs: dict, match: str) -> None:
    ids, mask = _prompts()
    kwargs.setdefault("mask_id", TINY_MASK_ID)
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, ids, mask, **kwargs)


# --------------------------------------------------------------------------- exactness


def _sharp_model(seed: int = 0, vocab: int = TINY_VOCAB) -> torch.nn.Module:
    """A random built-in model with a large init, so its softmax is peaked (no near-ties)."""
    return build_tiny_model(
        seed,
        vocab_size=vocab,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.3,
        pad_token_id=None,
        eos_token_id=None,
    )


@pytest.fixture(scope="module")
def sharp_model() -> torch.nn.Module:
    return _sharp_model()


@torch.no_grad()
def reference_generate(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor,
    gen_length: int,
    block_length: int,
    steps: int,
    mask_id: int,
) -> torch.Tensor:
    """LLaDA's generator at temperature 0, written out plainly (one row at a time for top-k)."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    full_mask = torch.cat([attention_mask, torch.ones(b, gen_length, dtype=torch.long)], dim=1)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        start, end = p + nb * block_length, p + (nb + 1) * block_length
        counts = (x[:, start:end] == mask_id).sum(1).tolist()
        plan = [
            [c // steps_per_block + (i < c % steps_per_block) for i in range(steps_per_block)]
            for c in counts
        ]
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(input_ids=x, attention_mask=full_mask).logits
            logits[..., mask_id] = float("-inf")
            x0 = logits.argmax(-1)
            probs = torch.softmax(logits.double(), dim=-1)
            x0_p = torch.gather(probs, -1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf")).double())
            for j in range(b):
                _, idx = torch.topk(confidence[j], k=plan[j][i])
                x[j, idx] = x0[j, idx]
    return x


def _mixed_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 3, 6 and 1."""
    ids = torch.tensor([[0, 0, 0, 9, 4, 12], [3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 20]])
    mask = (torch.arange(6)[None] >= torch.tensor([[3], [0], [5]])).long()
    return ids, mask


@pytest.mark.parametrize(
    ("gen_length", "block_length", "steps"),
    [(8, 8, 8), (8, 8, 3), (12, 4, 6), (16, 8, 4), (12, 4, 3)],
)
def test_exact_mode_matches_reference_token_for_token(
    sharp_model, gen_length: int, block_length: int, steps: int
) -> None:
    ids, mask = _mixed_prompts()
    kw = dict(gen_length=gen_length, block_length=block_length, steps=steps, mask_id=TINY_MASK_ID)
    out = generate(sharp_model, ids, mask, **kw)
    ref = reference_generate(sharp_model, ids, mask, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "fast",
    [
        {},
        {"threshold": 0.5},
        {"cache": "prefix"},
        {"cache": "dual", "threshold": 0.7},
        {"cfg_scale": 1.5, "cache": "dual"},
    ],
)
def test_left_padded_rows_equal_decoding_each_alone(sharp_model, fast: dict) -> None:
    ids, mask = _mixed_prompts()
    kw = dict(gen_length=8, block_length=4, steps=8, mask_id=TINY_MASK_ID, **fast)
    batch = generate(sharp_model, ids, mask, **kw)
    for row in range(ids.shape[0]):
        real = ids[row, mask[row].bool()][None]
        alone = generate(sharp_model, real, **kw)
        assert torch.equal(batch[row, -8:], alone[0, -8:]), f"row {row}"


def test_cfg_zero_scale_matches_plain_and_positive_scale_runs(sharp_model) -> None:
    ids, mask = _mixed_prompts()
    kw = dict(gen_length=8, block_length=4, steps=4, mask_id=TINY_MASK_ID)
    stats = DecodeStats()
    out = generate(sharp_model, ids, mask, cfg_scale=2.0, stats=stats, **kw)
    assert not (out == TINY_MASK_ID).any() and stats.forward_passes == 4
    # The guided batch is doubled: conditional rows then unconditional ones.
    assert stats.positions_computed == 4 * 2 * 3 * 14


# --------------------------------------------------------------------------- sampling


def _chi2_critical(df: int, z: float = 3.0902) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: alpha = 1e-3)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_sampled_token_distribution_matches_softmax_over_temperature(sharp_model) -> None:
    n, temperature = 6000, 0.7
    prompt = torch.tensor([[5, 9, 2]]).expand(n, -1)
    out = generate(
        sharp_model,
        prompt,
        gen_length=1,
        block_length=1,
        steps=1,
        mask_id=TINY_MASK_ID,
        temperature=temperature,
        generator=torch.Generator().manual_seed(11),
    )
    with torch.no_grad():
        x = torch.tensor([[5, 9, 2, TINY_MASK_ID]])
        logits = sharp_model(input_ids=x).logits[0, -1].double()
    logits[TINY_MASK_ID] = float("-inf")
    expected = torch.softmax(logits / temperature, -1) * n
    observed = torch.bincount(out[:, -1], minlength=TINY_VOCAB).double()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:  # fold the rare tail into the smallest kept category
        obs, exp = obs[:-1], exp[:-1]
        obs[exp.argmin()] += observed[~big].sum()
        exp[exp.argmin()] += expected[~big].sum()
    df = obs.numel() - 1
    assert df >= 3
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < _chi2_critical(df), (chi2, df)


@pytest.mark.parametrize("fast", [{}, {"threshold": 0.3, "cache": "prefix"}, {"cache": "dual"}])
def test_seeded_sampling_is_reproducible_in_every_mode(sharp_model, fast: dict) -> None:
    ids, mask = _mixed_prompts()
    kw = dict(gen_length=8, block_length=4, steps=4, mask_id=TINY_MASK_ID, temperature=0.9, **fast)
    a = generate(sharp_model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(sharp_model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(sharp_model, ids, mask, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- fast modes


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cached_forward_reproduces_the_full_forward(sharp_model, cfg_scale: float) -> None:
    from actors.decoding import _Forward

    ids, mask = _mixed_prompts()
    p, g = ids.shape[1], 8
    x = torch.cat([ids, torch.full((3, g), TINY_MASK_ID)], dim=1)
    x[:, p : p + 3] = torch.tensor([4, 5, 6])
    full_mask = torch.cat([mask, torch.ones(3, g, dtype=torch.long)], dim=1)
    fwd = _Forward(sharp_model, full_mask, p, TINY_MASK_ID, cfg_scale, (), DecodeStats())
    rows = torch.tensor([2, 0])
    start, end = p + 4, p + 8
    want = fwd.full(x, rows, start, end)
    got, kv = fwd.full_with_cache(x, rows, start, end)
    torch.testing.assert_close(got, want)
    prefix = kv.select_positions(slice(0, start))
    torch.testing.assert_close(fwd.partial(x, rows, start, p + g, end, prefix), want)
    keep = torch.cat([torch.arange(start), torch.arange(end, p + g)])
    torch.testing.assert_close(
        fwd.partial(x, rows, start, end, end, kv.select_positions(keep)), want
    )


def test_prefix_and_dual_cache_compute_fewer_positions(sharp_model) -> None:
    ids, mask = _mixed_prompts()
    kw = dict(gen_length=8, block_length=4, steps=8, mask_id=TINY_MASK_ID)
    counts = {}
    for cache in (None, "prefix", "dual"):
        stats = DecodeStats()
        out = generate(sharp_model, ids, mask, cache=cache, stats=stats, **kw)
        assert not (out == TINY_MASK_ID).any() and stats.forward_passes == 8
        counts[cache] = stats.positions_computed
    total = 6 + 8  # prompt width + window
    assert counts[None] == 3 * 8 * total
    # Per block: one full forward, then 3 steps on block+suffix (prefix) or block (dual).
    assert counts["prefix"] == 3 * (2 * total + 3 * 8 + 3 * 4)
    assert counts["dual"] == 3 * (2 * total + 3 * 4 + 3 * 4)


def test_threshold_one_per_block_forward_with_cache(sharp_model) -> None:
    ids, mask = _mixed_prompts()
    stats = DecodeStats()
    out = generate(
        sharp_model,
        ids,
        mask,
        gen_length=12,
        block_length=4,
        steps=12,
        mask_id=TINY_MASK_ID,
        threshold=1e-9,
        cache="dual",
        stats=stats,
    )
    assert stats.forward_passes == 3 and not (out == TINY_MASK_ID).any()


def test_cache_on_a_model_without_one_warns_and_decodes_exactly(sharp_model) -> None:
    class NoCache(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    ids, mask = _mixed_prompts()
    kw = dict(gen_length=8, block_length=4, steps=4, mask_id=TINY_MASK_ID)
    with pytest.warns(UserWarning, match="no key/value cache"):
        out = generate(NoCache(sharp_model), ids, mask, cache="prefix", **kw)
    assert torch.equal(out, generate(sharp_model, ids, mask, **kw))


class _Scripted(torch.nn.Module):
    """Logits set by each row's first prompt token: 2 -> EOS (1) sure; 3 -> token 7 unsure."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, TINY_VOCAB)
        eos_row = input_ids[:, 0] == 2
        logits[eos_row, :, 1] = 10.0
        logits[~eos_row, :, 7] = 1.0
        # A slightly rising bonus so one position of an unsure row wins each step.
        logits[~eos_row, :, 7] += torch.linspace(0, 0.1, t)

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_finished_rows_stop_costing_compute() -> None:
    model = _Scripted()
    ids = torch.tensor([[2, 5], [3, 5]])
    stats = DecodeStats()
    out = generate(
        model,
        ids,
        gen_length=8,
        block_length=4,
        steps=8,
        mask_id=TINY_MASK_ID,
        threshold=0.9,
        eos_id=1,
        stop_at_eos=True,
        stats=stats,
    )
    assert (out[0, 2:] == 1).all() and (out[1, 2:] == 7).all()
    # Block 1: both rows once, then row 1 alone 3 more times; block 2: row 1 alone 4 times.
    assert stats.forward_passes == 8
    assert stats.positions_computed == 10 * (2 + 3 + 4)


def test_threshold_mode_never_needs_more_forwards_than_exact(tiny_model) -> None:
    ids, mask = _prompts()
    kw = dict(gen_length=8, block_length=4, steps=4, mask_id=TINY_MASK_ID)
    exact_stats, thr_stats = DecodeStats(), DecodeStats()
    exact = generate(tiny_model, ids, mask, stats=exact_stats, **kw)
    # The random model is never sure, so the schedule's floor decides every commit.
    thr = generate(tiny_model, ids, mask, threshold=1.0, stats=thr_stats, **kw)
    assert torch.equal(thr, exact)
    assert thr_stats.forward_passes == exact_stats.forward_passes == 4


# --------------------------------------------------------------------------- stop ids

EOT = 4  # stands for an end-of-turn id such as LLaDA's <|eot_id|>; EOS is 1


class _Prefers(torch.nn.Module):
    """Logits that strongly favour ``ids`` at every position (a little noise between them)."""

    def __init__(self, ids: tuple[int, ...]) -> None:
        super().__init__()
        self.ids = list(ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, TINY_VOCAB)
        logits[..., self.ids] = 10.0 + torch.rand(b, t, len(self.ids))

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_suppress_eos_bans_every_stop_id() -> None:
    model = _Prefers((1, EOT))
    ids = torch.tensor([[5, 6], [7, 8]])
    kw = dict(gen_length=8, block_length=4, steps=8, mask_id=TINY_MASK_ID, temperature=1.0)
    free = generate(model, ids, eos_id=1, generator=torch.Generator().manual_seed(0), **kw)
    assert set(free[:, 2:].unique().tolist()) == {1, EOT}
    eos_only = generate(
        model, ids, eos_id=1, suppress_eos=True, generator=torch.Generator().manual_seed(0), **kw
    )
    assert not (eos_only[:, 2:] == 1).any() and (eos_only[:, 2:] == EOT).all()
    both = generate(
        model,
        ids,
        eos_id=1,
        stop_ids=[EOT],
        suppress_eos=True,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    comp = both[:, 2:]
    assert not ((comp == 1) | (comp == EOT) | (comp == TINY_MASK_ID)).any()


# Each row's completion, chosen by its first prompt token; 9 stands for text after the end.
_SCRIPTS = {
    2: [7, 7, EOT, 1, 9, 9, 9, 9, 9, 9, 9, 9],  # <eot> then EOS fill: stops after block 1
    3: [7, EOT, 9, 1, 9, 9, 9, 9, 9, 9, 9, 9],  # text after the <eot>: never stops
    5: [7, 7, 7, EOT, 9, 9, 9, 9, 9, 9, 9, 9],  # <eot> ends the block: stops after block 1
    6: [9, 9, 9, 9, 1, EOT, 1, 1, 9, 9, 9, 9],  # a block of stop ids only: stops after block 2
}


class _Script(torch.nn.Module):
    """Sure of ``_SCRIPTS[first prompt token]`` at the completion's positions (the last 12)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, TINY_VOCAB)
        for r in range(b):
            script = torch.tensor(_SCRIPTS[int(input_ids[r, 0])])
            logits[r, torch.arange(t - 12, t), script] = 10.0

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_stop_at_eos_stops_at_an_end_of_turn_id_and_fills_with_eos() -> None:
    ids = torch.tensor([[2, 0], [3, 0], [5, 0], [6, 0]])
    kw = dict(gen_length=12, block_length=4, steps=12, mask_id=TINY_MASK_ID, eos_id=1)
    full_stats, stop_stats = DecodeStats(), DecodeStats()
    full = generate(_Script(), ids, stats=full_stats, **kw)
    assert full[:, 2:].tolist() == [_SCRIPTS[k] for k in (2, 3, 5, 6)]
    out = generate(_Script(), ids, stop_ids=[EOT], stop_at_eos=True, stats=stop_stats, **kw)
    assert out[:, 2:].tolist() == [
        [7, 7, EOT, 1] + [1] * 8,
        _SCRIPTS[3],
        [7, 7, 7, EOT] + [1] * 8,
        [9, 9, 9, 9, 1, EOT, 1, 1] + [1] * 4,
    ]
    # Rows run: block 1 all four, block 2 rows 3 and 6, block 3 row 3 (4 steps a block).
    assert stop_stats.positions_computed == 14 * 4 * (4 + 2 + 1)
    assert full_stats.positions_computed == 14 * 4 * 12
    # With the EOS alone, <eot> is text: only the row ending its block with EOS stops.
    eos_only = generate(_Script(), ids, stop_at_eos=True, **kw)
    assert eos_only[0, 2:].tolist() == [7, 7, EOT, 1] + [1] * 8
    assert eos_only[2, 2:].tolist() == _SCRIPTS[5]


def test_stop_ids_without_eos_fill_with_the_first_stop_id() -> None:
    ids = torch.tensor([[2, 0], [5, 0]])
    kw = dict(gen_length=12, block_length=4, steps=12, mask_id=TINY_MASK_ID)
    out = generate(_Script(), ids, stop_ids=[EOT, 1], stop_at_eos=True, **kw)
    assert out[:, 2:].tolist() == [[7, 7, EOT, 1] + [EOT] * 8, [7, 7, 7, EOT] + [EOT] * 8]
    with pytest.raises(ValueError, match="cannot also be a stop id"):
        generate(_Script(), ids, eos_id=1, stop_ids=[TINY_MASK_ID], **kw)


def test_a_lora_wrapped_model_keeps_its_cache(sharp_model) -> None:
    """peft's wrapper takes ``**kwargs``; the cache must still be used through it."""
    pytest.importorskip("peft")
    from actors.decoding import supports_kv_cache
    from embr_rl.core.config import LoraConfig
    from embr_rl.core.models.lora import wrap_lora

    wrapped = wrap_lora(sharp_model, LoraConfig(enabled=True, r=2, dropout=0.0)).eval()
    assert supports_kv_cache(wrapped)
    ids, mask = _mixed_prompts()
    kw = dict(gen_length=8, block_length=4, steps=4, mask_id=TINY_MASK_ID)
    exact, fast = DecodeStats(), DecodeStats()
    generate(wrapped, ids, mask, stats=exact, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(wrapped, ids, mask, cache="dual", stats=fast, **kw)
    assert fast.positions_computed < exact.positions_computed


# --------------------------------------------------------------------------- continuous batching


def _seven_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Seven left-padded prompts of lengths 1 to 6."""
    lengths = torch.tensor([3, 6, 1, 5, 2, 6, 4])
    mask = (torch.arange(6)[None] >= (6 - lengths)[:, None]).long()
    ids = (torch.arange(7 * 6).reshape(7, 6) % 25 + 2) * mask
    return ids, mask


@pytest.mark.parametrize(
    "fast",
    [
        {},
        {"threshold": 0.5},
        {"cache": "dual"},
        {"cache": "dual", "threshold": 0.7},
        {"cfg_scale": 1.5, "cache": "dual", "threshold": 0.6},
    ],
)
@pytest.mark.parametrize("slots", [1, 3])
def test_continuous_batching_decodes_every_row_as_generate_does(
    sharp_model, fast: dict, slots: int
) -> None:
    """Greedy: a row refilled into a freed slot, at its own block and step beside rows at
    other blocks, decodes to what the batch decoder gives it, in every supported mode."""
    ids, mask = _seven_prompts()
    kw = dict(gen_length=12, block_length=4, steps=12, mask_id=TINY_MASK_ID, **fast)
    want_stats, got_stats = DecodeStats(), DecodeStats()
    want = generate(sharp_model, ids, mask, stats=want_stats, **kw)
    got = generate(sharp_model, ids, mask, slots=slots, stats=got_stats, **kw)
    assert torch.equal(got, want)
    # Each row costs what it costs in the batch decoder: the same positions in all.
    assert got_stats.positions_computed == want_stats.positions_computed
    assert got_stats.tokens_committed == want_stats.tokens_committed == 7 * 12


def test_continuous_batching_refills_a_stopped_rows_slot_at_once() -> None:
    """Two slots, four prompts: rows that stop after their first block free their slot for the
    next prompt, and no forward runs a slot without a row."""
    ids = torch.tensor([[2, 0], [3, 0], [5, 0], [6, 0]])
    kw = dict(gen_length=12, block_length=4, steps=12, mask_id=TINY_MASK_ID, eos_id=1)
    kw |= dict(stop_ids=[EOT], stop_at_eos=True)
    want = generate(_Script(), ids, **kw)
    stats = DecodeStats()
    got = generate(_Script(), ids, slots=2, stats=stats, **kw)
    assert torch.equal(got, want)
    # Blocks decoded: 1 + 3 + 1 + 2 = 7, 4 steps each, the same positions as the batch decoder.
    assert stats.positions_computed == 14 * 4 * 7
    # Slot A: prompt 2 (block 1), then 5 (block 1), then 6 (blocks 1-2); slot B: prompt 3
    # (blocks 1-3). Both slots are full for 12 forwards, A runs alone for the last 4.
    assert stats.forward_passes == 16


def test_continuous_batching_samples_every_position_and_checks_its_arguments(tiny_model) -> None:
    ids, mask = _seven_prompts()
    kw = dict(gen_length=8, block_length=4, steps=4, mask_id=TINY_MASK_ID)
    out = generate(
        tiny_model,
        ids,
        mask,
        slots=3,
        temperature=0.9,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    assert torch.equal(out[:, :6], ids) and not (out == TINY_MASK_ID).any()
    with pytest.raises(ValueError, match="not 'prefix'"):
        generate(tiny_model, ids, mask, slots=2, cache="prefix", **kw)
    with pytest.raises(ValueError, match="slots must be >= 1"):
        generate(tiny_model, ids, mask, slots=0, **kw)
