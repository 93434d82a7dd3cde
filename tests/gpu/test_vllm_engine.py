"""The real vLLM engine and the torch engine on a GPU (``gpu`` marker; skipped without CUDA).

The vLLM test needs the ``vllm`` extra and a diffusion model that vLLM serves, named by
``EMBR_VLLM_MODEL`` (a hub id or local directory); it is skipped when either is missing.
"""

from __future__ import annotations

import os

import pytest
import torch

from actors.engines import DecodeOptions, RolloutEngine, build_engine

pytestmark = pytest.mark.gpu


def test_vllm_engine_generates_full_windows() -> None:
    pytest.importorskip("vllm")
    model = os.environ.get("EMBR_VLLM_MODEL")
    if not model:
        pytest.skip("set EMBR_VLLM_MODEL to a diffusion model that vLLM serves")
    engine = build_engine("vllm", model=model, max_batch_size=8, gpu_memory_utilization=0.5)
    assert isinstance(engine, RolloutEngine)
    opts = DecodeOptions(gen_length=32, block_length=32, steps=16, temperature=0.0)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    out = engine.generate(prompts, opts, seed=0)
    assert out.completion_ids.shape == (2, 32)
    again = engine.generate(prompts, opts, seed=0)
    assert torch.equal(out.completion_ids, again.completion_ids)


def test_torch_engine_cache_modes_on_cuda() -> None:
    from embr_rl.core.models import EmbrDiffusionConfig, EmbrDiffusionModel

    torch.manual_seed(0)
    cfg = EmbrDiffusionConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, mask_token_id=63)
    model = EmbrDiffusionModel(cfg).to("cuda", torch.bfloat16).eval()
    engine = build_engine("torch", model=model, mask_id=63, eos_id=1)
    prompts = [[5, 6, 7, 8], [9, 10]] * 4
    for cache in (None, "prefix", "dual"):
        opts = DecodeOptions(gen_length=64, block_length=32, steps=32, threshold=0.9, cache=cache)
        out = engine.generate(prompts, opts, seed=0)
        assert out.completion_ids.shape == (8, 64) and not (out.completion_ids == 63).any()
