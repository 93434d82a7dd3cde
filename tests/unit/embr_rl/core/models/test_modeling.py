"""The built-in masked-diffusion transformer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

from embr_rl.core.models import EmbrDiffusionConfig, EmbrDiffusionModel
from tests.conftest import TINY_MASK_ID, TINY_VOCAB


def _ids(b: int = 3, t: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, TINY_VOCAB, (b, t), generator=g)


def test_logits_shape_and_hidden_states(tiny_model: EmbrDiffusionModel) -> None:
    x = _ids()
    out = tiny_model(input_ids=x, output_hidden_states=True)
    assert out.logits.shape == (3, 12, TINY_VOCAB)
    assert len(out.hidden_states) == tiny_model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_attention_is_bidirectional(tiny_model: EmbrDiffusionModel) -> None:
    x = _ids()
    y = x.clone()
    y[:, -1] = TINY_MASK_ID
    a, b = tiny_model(input_ids=x).logits, tiny_model(input_ids=y).logits
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first position sees the last one


def test_save_load_round_trip_identical_logits(
    tiny_model: EmbrDiffusionModel, tmp_path: Path
) -> None:
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "embr_mdm"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EmbrDiffusionModel)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, tiny_model(input_ids=x).logits)
    assert loaded.config.mask_token_id == TINY_MASK_ID


def test_left_padding_gives_same_logits_for_real_tokens(tiny_model: EmbrDiffusionModel) -> None:
    a, b = _ids(1, 7, seed=2), _ids(1, 11, seed=3)
    pad = 0
    batch = torch.full((2, 11), pad)
    batch[0, 4:] = a[0]
    batch[1] = b[0]
    mask = (torch.arange(11)[None] >= torch.tensor([[4], [0]])).long()
    with torch.no_grad():
        padded = tiny_model(input_ids=batch, attention_mask=mask).logits
        alone_a = tiny_model(input_ids=a).logits
        alone_b = tiny_model(input_ids=b).logits
    torch.testing.assert_close(padded[0, 4:], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1], alone_b[0], rtol=1e-5, atol=1e-5)
    # and the padding really is ignored: changing the pad tokens changes nothing
    batch2 = batch.clone()
    batch2[0, :4] = 5
    with torch.no_grad():
        padded2 = tiny_model(input_ids=batch2, attention_mask=mask).logits
    torch.testing.assert_close(padded2[0, 4:], padded[0, 4:], rtol=1e-5, atol=1e-5)


def test_all_padding_row_gives_finite_logits(tiny_model: EmbrDiffusionModel) -> None:
    x = _ids(2, 5)
    mask = torch.tensor([[0] * 5, [1] * 5])
    assert torch.isfinite(tiny_model(input_ids=x, attention_mask=mask).logits).all()


@pytest.mark.parametrize("keep", ["prefix", "dual"])
def test_kv_cache_reproduces_full_forward(tiny_model: EmbrDiffusionModel, keep: str) -> None:
    x = _ids(2, 16)
    with torch.no_grad():
        full = tiny_model(input_ids=x, use_cache=True)
        lo, hi = 8, 12  # the "current block"
        if keep == "prefix":
            cache = full.kv_cache.select_positions(slice(0, lo))
            new = slice(lo, 16)
        else:
            cache = full.kv_cache.select_positions(torch.tensor([*range(lo), *range(hi, 16)]))
            new = slice(lo, hi)
        pos = torch.arange(16)[new].expand(2, -1)
        part = tiny_model(input_ids=x[:, new], position_ids=pos, kv_cache=cache).logits
    torch.testing.assert_close(part, full.logits[:, new], rtol=1e-5, atol=1e-5)


def test_kv_cache_rows_and_cat(tiny_model: EmbrDiffusionModel) -> None:
    x = _ids(3, 10)
    with torch.no_grad():
        full = tiny_model(input_ids=x, use_cache=True)
        head = full.kv_cache.select_positions(slice(0, 4))
        tail = full.kv_cache.select_positions(slice(8, 10))
        both = head.cat(tail).select_rows(torch.tensor([2]))
        part = tiny_model(
            input_ids=x[2:, 4:8], position_ids=torch.arange(4, 8)[None], kv_cache=both
        ).logits
    assert both.length == 6
    torch.testing.assert_close(part, full.logits[2:, 4:8], rtol=1e-5, atol=1e-5)


def test_cache_requires_positions(tiny_model: EmbrDiffusionModel) -> None:
    x = _ids(1, 6)
    cache = tiny_model(input_ids=x, use_cache=True).kv_cache
    with pytest.raises(ValueError, match="position_ids"):
        tiny_model(input_ids=x, kv_cache=cache)


def test_gradient_checkpointing_same_gradients(tiny_model: EmbrDiffusionModel) -> None:
    x = _ids(2, 8)

    def grads() -> list[torch.Tensor]:
        tiny_model.zero_grad()
        tiny_model(input_ids=x).logits.square().mean().backward()
        return [p.grad.clone() for p in tiny_model.parameters()]

    tiny_model.train()
    plain = grads()
    tiny_model.gradient_checkpointing = True
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)


def test_config_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        EmbrDiffusionConfig(hidden_size=64, num_attention_heads=5)
