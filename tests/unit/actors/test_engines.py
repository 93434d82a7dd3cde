"""Rollout engines: the protocol, the registry, the torch engine and a faked vLLM."""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence

import pytest
import torch

from actors.decoding import generate
from actors.engines import DecodeOptions, RolloutEngine, build_engine, engine_names
from actors.engines.torch_engine import TorchEngine
from embr_rl.core.models.tokenizer import left_pad
from tests.conftest import TINY_MASK_ID

PROMPTS: list[list[int]] = [[5, 6, 7], [9], [3, 4, 5, 6, 7], [12, 13]]
OPTIONS = DecodeOptions(gen_length=8, block_length=4, steps=4)


def test_registry_names_and_unknown_engine() -> None:
    assert {"torch", "vllm"} <= set(engine_names())
    with pytest.raises(ValueError, match=r"allowed: .*torch"):
        build_engine("tensorrt")


def test_options_from_config_takes_the_decoding_keys() -> None:
    from embr_rl.core.config import EvalConfig, RolloutConfig

    opts = DecodeOptions.from_config(RolloutConfig(threshold=0.9, cache="prefix"))
    assert (opts.threshold, opts.cache, opts.temperature, opts.gen_length) == (
        0.9,
        "prefix",
        0.9,
        32,
    )
    ev = DecodeOptions.from_config(EvalConfig(), cache="dual")
    assert ev.temperature == 0.0 and ev.cache == "dual" and ev.remasking == "low_confidence"


def test_torch_engine_matches_the_decoder_and_is_chunk_invariant(tiny_model) -> None:
    engine = build_engine("torch", model=tiny_model, mask_id=TINY_MASK_ID, max_batch_size=64)
    assert isinstance(engine, RolloutEngine) and engine.name == "torch"
    out = engine.generate(PROMPTS, OPTIONS, seed=0)
    ids, mask = left_pad(PROMPTS, 0)
    direct = generate(tiny_model, ids, mask, gen_length=8, block_length=4, steps=4, mask_id=31)
    assert torch.equal(out.completion_ids, direct[:, ids.shape[1] :])
    assert out.stats.forward_passes == 4 and out.stats.tokens_committed == 32
    small = TorchEngine(tiny_model, TINY_MASK_ID, max_batch_size=3).generate(PROMPTS, OPTIONS)
    assert torch.equal(small.completion_ids, out.completion_ids)
    assert small.stats.forward_passes == 8


def test_torch_engine_seeded_sampling_and_weight_update(tiny_model) -> None:
    engine = TorchEngine(tiny_model, TINY_MASK_ID)
    sampled = DecodeOptions(gen_length=8, block_length=4, steps=4, temperature=1.0)
    a = engine.generate(PROMPTS, sampled, seed=3).completion_ids
    assert torch.equal(a, engine.generate(PROMPTS, sampled, seed=3).completion_ids)
    before = engine.generate(PROMPTS, OPTIONS).completion_ids
    new = {k: torch.randn_like(v) for k, v in tiny_model.state_dict().items()}
    engine.update_weights(new)
    assert torch.equal(tiny_model.lm_head.weight, new["lm_head.weight"])
    assert not torch.equal(engine.generate(PROMPTS, OPTIONS).completion_ids, before)


def test_torch_engine_passes_every_stop_id_to_the_decoder(tiny_model) -> None:
    # 4 stands for an end-of-turn id; with it suppressed neither it nor the EOS appears.
    bias = torch.zeros(tiny_model.config.vocab_size)
    bias[[1, 4]] = 50.0
    with torch.no_grad():
        tiny_model.lm_head.bias = torch.nn.Parameter(bias)
    engine = build_engine(
        "torch", model=tiny_model, mask_id=TINY_MASK_ID, eos_id=1, stop_ids=[4], max_batch_size=2
    )
    assert engine.stop_ids == (4,)
    free = engine.generate(PROMPTS, OPTIONS, seed=0).completion_ids
    assert set(free.unique().tolist()) <= {1, 4}
    sup = DecodeOptions(gen_length=8, block_length=4, steps=4, suppress_eos=True)
    out = engine.generate(PROMPTS, sup, seed=0).completion_ids
    assert not ((out == 1) | (out == 4)).any()


# --------------------------------------------------------------------------- vLLM (faked)


class _FakeLLM:
    """Stands in for ``vllm.LLM``: echoes a prompt's last token, ``len(prompt)`` times."""

    def __init__(self, model: str, **kwargs: object) -> None:
        self.model, self.kwargs = model, kwargs
        self.calls: list[tuple[list[dict], object]] = []
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def generate(self, prompts: Sequence[dict], params: object, use_tqdm: bool = True) -> list:
        self.calls.append((list(prompts), params))
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            completion = types.SimpleNamespace(token_ids=[ids[-1]] * len(ids))
            outs.append(types.SimpleNamespace(outputs=[completion]))
        return outs

    def apply_model(self, fn):
        fake_model = types.SimpleNamespace(load_weights=self.loaded.extend)
        return [fn(fake_model)]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    vllm = types.ModuleType("vllm")
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return vllm


def test_vllm_engine_with_a_fake_vllm(fake_vllm) -> None:
    engine = build_engine("vllm", model="some/dllm", eos_id=1, max_batch_size=16, dtype="bfloat16")
    assert isinstance(engine, RolloutEngine) and engine.name == "vllm"
    assert engine.llm.kwargs == {"max_num_seqs": 16, "dtype": "bfloat16"}
    opts = DecodeOptions(gen_length=4, block_length=4, steps=2, temperature=0.9, threshold=0.9)
    out = engine.generate(PROMPTS, opts, seed=7)
    # The echo is len(prompt) long: cut to gen_length, or filled with EOS up to it.
    assert out.completion_ids.tolist() == [[7, 7, 7, 1], [9, 1, 1, 1], [7] * 4, [13, 13, 1, 1]]
    prompts, params = engine.llm.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == PROMPTS
    assert (params.temperature, params.max_tokens, params.seed) == (0.9, 4, 7)
    assert params.extra_args["threshold"] == 0.9 and params.extra_args["steps"] == 2
    assert params.stop_token_ids is None and params.min_tokens == 0
    engine.update_weights({"w": torch.ones(2)})
    assert [k for k, _ in engine.llm.loaded] == ["w"]


def test_vllm_engine_stops_at_end_of_turn_ids(fake_vllm) -> None:
    engine = build_engine("vllm", model="some/dllm", eos_id=1, stop_ids=[1, 4, 6])
    engine.generate(PROMPTS, DecodeOptions(gen_length=4, block_length=4, steps=2))
    assert engine.llm.calls[-1][1].stop_token_ids == [4, 6]
    engine.generate(
        PROMPTS, DecodeOptions(gen_length=4, block_length=4, steps=2, suppress_eos=True)
    )
    assert engine.llm.calls[-1][1].min_tokens == 4


def test_vllm_engine_without_vllm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="'vllm' extra"):
        build_engine("vllm", model="some/dllm")
