"""Rollout engines: the protocol, the registry, the torch engine and a faked vLLM."""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from weight_broadcast import broadcast_over_gloo

from actors.decoding import generate
from actors.engines import DecodeOptions, RolloutEngine, build_engine, engine_names
from actors.engines.torch_engine import TorchEngine
from embr_rl.core.models.tokenizer import left_pad
from embr_rl.core.transport import (
    WeightClient,
    build_manifest,
)
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
    # Continuous batching over 3 slots: the same greedy rows, the four prompts left-padded
    # together (no chunk boundary), a freed slot refilled at once.
    flowing = TorchEngine(tiny_model, TINY_MASK_ID, max_batch_size=3).generate(
        PROMPTS, dataclasses.replace(OPTIONS, continuous_batching=True)
    )
    assert torch.equal(flowing.completion_ids, out.completion_ids)
    assert flowing.stats.tokens_committed == 32


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


# --------------------------------------------------------------------------- weight broadcast


def _loaded(model: torch.nn.Module) -> Any:
    from embr_rl.core.models.loader import LoadedModel

    return LoadedModel(
        model=model,
        tokenizer=None,
        mask_token_id=TINY_MASK_ID,
        eos_token_id=1,
        pad_token_id=0,
        chat_template=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def _lora() -> Any:
    from embr_rl.core.config import LoraConfig

    return LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)


def test_torch_engine_updates_a_subset_by_name_and_checks_first(tiny_model) -> None:
    engine = TorchEngine(tiny_model, TINY_MASK_ID)
    specs = {s.name: s for s in engine.weight_specs()}
    assert {n for n, _ in tiny_model.named_parameters()} <= set(specs)
    assert specs["lm_head.weight"].shape == tuple(tiny_model.lm_head.weight.shape)
    before = tiny_model.embed_tokens.weight.clone()
    engine.update_weights({"lm_head.weight": torch.ones_like(tiny_model.lm_head.weight)})
    assert bool((tiny_model.lm_head.weight == 1).all())
    assert torch.equal(tiny_model.embed_tokens.weight, before)
    bad = {"embed_tokens.weight": torch.zeros_like(before), "no.such": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"no\.such"):
        engine.update_weights(bad)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({"embed_tokens.weight": torch.zeros(3)})
    assert torch.equal(tiny_model.embed_tokens.weight, before)  # nothing copied


def test_torch_engine_takes_a_lora_adapterbroadcast_over_gloo(tiny_model) -> None:
    pytest.importorskip("peft")
    from embr_rl.core.models.lora import for_inference, wrap_lora

    learner = wrap_lora(copy.deepcopy(tiny_model), _lora())
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    adapter = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    assert adapter and all("lora_" in n for n, _ in adapter)
    engine = TorchEngine(for_inference(tiny_model, _lora()), TINY_MASK_ID)
    base = {n: p.clone() for n, p in engine.model.named_parameters() if "lora_" not in n}
    client = WeightClient(engine, version=0)
    manifest = build_manifest([(n, tuple(p.shape), p.dtype) for n, p in adapter], 1.0)
    broadcast_over_gloo(manifest, [p for _, p in adapter], 1, client.connect, client.receive)
    assert client.apply_pending() == 1
    got = dict(engine.model.named_parameters())
    for name, p in adapter:
        assert torch.equal(got[name], p), name
    assert all(torch.equal(got[n], p) for n, p in base.items())
    client.close()


def test_vllm_engine_takes_a_broadcast_through_vllms_loader(fake_vllm, tiny_model) -> None:
    engine = build_engine("vllm", loaded=_loaded(tiny_model))
    assert not hasattr(engine, "model")
    specs = {s.name: s for s in engine.weight_specs()}
    named = [(n, torch.randn_like(p)) for n, p in tiny_model.named_parameters()]
    assert all(specs[n].shape == tuple(t.shape) for n, t in named)
    client = WeightClient(engine, version=0)
    manifest = build_manifest([(n, tuple(t.shape), t.dtype) for n, t in named], 0.005)
    broadcast_over_gloo(manifest, [t for _, t in named], 3, client.connect, client.receive)
    assert engine.llm.loaded == []  # staged only
    assert client.apply_pending() == 3
    assert [k for k, _ in engine.llm.loaded] == [n for n, _ in named]
    got = dict(engine.llm.loaded)
    for name, value in named:
        assert torch.equal(got[name], value), name
    client.close()


def test_vllm_engine_refuses_a_lora_model(fake_vllm, tiny_model) -> None:
    pytest.importorskip("peft")
    from embr_rl.core.models.lora import wrap_lora

    with pytest.raises(ValueError, match=r"rollout\.engine='torch'"):
        build_engine("vllm", loaded=_loaded(wrap_lora(tiny_model, _lora())))


def test_vllm_loader_without_apply_model_uses_the_driver_worker() -> None:
    from actors.engines.vllm_engine import _apply_model_loader

    got: list[tuple[str, torch.Tensor]] = []
    model = types.SimpleNamespace(load_weights=got.extend)
    runner = types.SimpleNamespace(model=model)
    executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
    llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(model_executor=executor))
    _apply_model_loader(llm, {"w": torch.ones(2)})
    assert [k for k, _ in got] == ["w"]
