"""Native LLaDA and Dream on tiny snapshots laid out as the hub's: logits against the
originals' mathematics, the cache, checkpointing, dtypes, saving, LoRA targets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from actors.decoding import DecodeStats, _Forward, generate
from embr_rl.core.config import LoraConfig, ModelConfig
from embr_rl.core.models.loader import ModelLoadError, load_model
from embr_rl.core.models.lora import wrap_lora
from embr_rl.core.models.native import DreamNativeModel, LLaDANativeModel
from tests.hub_snapshots import (
    dream_reference,
    dream_snapshot,
    llada_reference,
    llada_snapshot,
    load_state,
)

FAMILIES = {
    "llada": (llada_snapshot, llada_reference, LLaDANativeModel),
    "Dream": (dream_snapshot, dream_reference, DreamNativeModel),
}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {name: make(root / name) for name, (make, _, _) in FAMILIES.items()}


def _load(path: Path, **kw: object):
    return load_model(ModelConfig(path=str(path), device="cpu", dtype="float32", **kw))


def _batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 40, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
        mask[2, :7] = 0
    return ids, mask


def _scored(family: str, mask: torch.Tensor) -> torch.Tensor:
    """Positions whose logits mean something: real ones, for Dream also with a real
    predecessor (its logit for token i comes from position i - 1)."""
    real = mask.bool().clone()
    if family == "Dream":
        real[:, 1:] &= mask.bool()[:, :-1]
        real[:, 0] = False
    return real


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_logits_equal_the_originals_mathematics(
    snapshots: dict[str, Path], family: str, padded: bool
) -> None:
    path = snapshots[family]
    loaded = _load(path)
    assert type(loaded.model) is FAMILIES[family][2]
    ids, mask = _batch(padded)
    with torch.no_grad():
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
    config = json.loads((path / "config.json").read_text())
    want = FAMILIES[family][1](load_state(path), config, ids, mask)
    keep = _scored(family, mask)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_llada_with_grouped_query_heads_matches(tmp_path: Path) -> None:
    path = llada_snapshot(tmp_path, n_heads=4, n_kv_heads=2, seed=5)
    ids, mask = _batch(True)
    with torch.no_grad():
        got = _load(path).model(input_ids=ids, attention_mask=mask).logits
    want = llada_reference(
        load_state(path), json.loads((path / "config.json").read_text()), ids, mask
    )
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


def test_dream_logits_are_position_aligned(snapshots: dict[str, Path]) -> None:
    """Changing token j changes Dream's raw logit at j (predicting j + 1), so the aligned
    logit that changes without any bidirectional help is the one at j + 1's row: check the
    alignment directly against the unshifted head instead."""
    model = _load(snapshots["Dream"]).model
    ids, mask = _batch(False)
    with torch.no_grad():
        aligned = model(input_ids=ids, attention_mask=mask).logits
        raw = model._unshifted(ids, mask.bool(), torch.arange(12).expand(3, 12), None, False)[0]
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
    assert not torch.allclose(aligned[:, 1:], raw[:, 1:])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_path_runs_no_remote_code_and_finds_stop_ids(
    snapshots: dict[str, Path], family: str
) -> None:
    path = snapshots[family]
    # The snapshot's modelling files raise when imported; trust_remote_code stays false.
    loaded = _load(path)
    vocab = loaded.tokenizer.get_vocab()
    eot = "<|eot_id|>" if family == "llada" else "<|im_end|>"
    assert loaded.stop_token_ids == (loaded.eos_token_id, vocab[eot])
    assert loaded.mask_token_id == loaded.tokenizer.mask_token_id
    with pytest.raises(ModelLoadError, match=r"trust_remote_code=true"):
        _load(path, implementation="remote")


def test_native_on_a_model_type_without_one_is_a_clear_error(tmp_path: Path, tiny_model) -> None:
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"native implementations exist for: Dream, llada"):
        _load(tmp_path, implementation="native")


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_forwards_equal_the_full_forward(
    snapshots: dict[str, Path], family: str, cfg_scale: float
) -> None:
    loaded = _load(snapshots[family])
    mask_id = loaded.mask_token_id
    ids, mask = _batch(True)
    p, g = ids.shape[1], 8
    x = torch.cat([ids, torch.full((3, g), mask_id)], dim=1)
    x[:, p : p + 3] = torch.tensor([7, 8, 9])
    full_mask = torch.cat([mask, torch.ones(3, g, dtype=torch.long)], dim=1)
    fwd = _Forward(loaded.model, full_mask, p, mask_id, cfg_scale, [mask_id], DecodeStats())
    rows = torch.tensor([2, 0, 1])
    start, end = p + 4, p + 8
    want = fwd.full(x, rows, start, end)
    got, kv = fwd.full_with_cache(x, rows, start, end)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    prefix = kv.select_positions(slice(0, start))
    torch.testing.assert_close(
        fwd.partial(x, rows, start, p + g, end, prefix), want, rtol=1e-5, atol=1e-5
    )
    keep = torch.cat([torch.arange(start), torch.arange(end, p + g)])
    dual = kv.select_positions(keep)
    torch.testing.assert_close(
        fwd.partial(x, rows, start, end, end, dual), want, rtol=1e-5, atol=1e-5
    )


def test_dream_cached_forward_needs_its_predecessor(snapshots: dict[str, Path]) -> None:
    model = _load(snapshots["Dream"]).model
    ids = torch.randint(5, 40, (1, 8))
    with torch.no_grad():
        kv = model(input_ids=ids, use_cache=True).kv_cache
        with pytest.raises(ValueError, match="position before the first new one"):
            model(
                input_ids=ids[:, 5:],
                position_ids=torch.arange(5, 8)[None],
                kv_cache=kv.select_positions(slice(0, 3)),
            )


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_decoder_uses_the_cache(snapshots: dict[str, Path], family: str, cache: str) -> None:
    loaded = _load(snapshots[family])
    ids, mask = _batch(True)
    kw = dict(gen_length=16, block_length=8, steps=8, mask_id=loaded.mask_token_id)
    exact, fast = DecodeStats(), DecodeStats()
    generate(loaded.model, ids, mask, stats=exact, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "no key/value cache" fallback warns
        out = generate(loaded.model, ids, mask, cache=cache, stats=fast, **kw)
    assert fast.positions_computed < exact.positions_computed
    assert not (out[:, ids.shape[1] :] == loaded.mask_token_id).any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_checkpointing_recomputes_with_the_same_gradients(
    snapshots: dict[str, Path], family: str
) -> None:
    loaded = load_model(
        ModelConfig(
            path=str(snapshots[family]), device="cpu", dtype="float32", gradient_checkpointing=True
        ),
        for_training=True,
    )
    model = loaded.model
    assert model.training and model.gradient_checkpointing
    layers = model.model.transformer["blocks"] if family == "llada" else model.model.layers
    calls: list[int] = []
    inner = layers[0].forward

    def counted(*args: object) -> object:
        calls.append(1)
        return inner(*args)

    layers[0].forward = counted
    ids, mask = _batch(True)

    def grads() -> torch.Tensor:
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    with_ckpt = grads()
    assert len(calls) == 2  # the forward, then its recomputation in backward
    model.gradient_checkpointing = False
    calls.clear()
    torch.testing.assert_close(grads(), with_ckpt)
    assert len(calls) == 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_load_is_close_to_float32(snapshots: dict[str, Path], family: str) -> None:
    fp32 = _load(snapshots[family]).model
    bf16 = load_model(
        ModelConfig(path=str(snapshots[family]), device="cpu", dtype="bfloat16")
    ).model
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids, mask = _batch(True)
    with torch.no_grad():
        a = fp32(input_ids=ids, attention_mask=mask).logits
        b = bf16(input_ids=ids, attention_mask=mask).logits.float()
    keep = _scored(family, mask)
    assert torch.isfinite(b).all()
    assert (a - b)[keep].abs().max() < 0.05 * a[keep].abs().max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_and_reload_keep_the_hub_layout(
    snapshots: dict[str, Path], family: str, tmp_path: Path
) -> None:
    loaded = _load(snapshots[family])
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    hub = json.loads((snapshots[family] / "config.json").read_text())
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("model_type", "vocab_size", "mask_token_id"):
        assert saved[key] == hub[key]
    if family == "llada":
        assert (saved["d_model"], saved["n_layers"], saved["weight_tying"]) == (
            hub["d_model"],
            hub["n_layers"],
            False,
        )
    else:
        assert saved["tie_word_embeddings"] is False and saved["rope_scaling"] is None
    assert set(loaded.model.state_dict()) == set(load_state(snapshots[family]))
    again = _load(tmp_path)
    ids, mask = _batch(False)
    with torch.no_grad():
        torch.testing.assert_close(
            again.model(input_ids=ids, attention_mask=mask).logits,
            loaded.model(input_ids=ids, attention_mask=mask).logits,
        )


def test_lora_targets_must_exist(snapshots: dict[str, Path]) -> None:
    model = _load(snapshots["llada"]).model
    with pytest.raises(ValueError, match=r"\['o_proj'\].*attn_out, ff_out, ff_proj"):
        wrap_lora(model, LoraConfig(enabled=True))  # the default list names o_proj
    wrapped = wrap_lora(model, LoraConfig(enabled=True, target_modules=["q_proj", "attn_out"]))
    names = [n for n, _ in wrapped.named_parameters() if "lora_A" in n]
    assert len(names) == 2 * 2 and any("attn_out" in n for n in names)


def test_unsupported_llada_option_is_named(tmp_path: Path) -> None:
    path = llada_snapshot(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["block_type"] = "sequential"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"block_type='sequential'.*implementation=remote"):
        _load(path)


def test_model_revision_reaches_every_hub_read(
    snapshots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model.revision`` pins config, tokenizer and weights alike (a local folder ignores it,
    so the calls are watched here)."""
    import transformers

    from embr_rl.core.models.native import NATIVE_MODELS

    seen: dict[str, object] = {}
    native = NATIVE_MODELS["llada"]
    for name, owner in (
        ("config", native.config_class),
        ("model", native.model_class),
        ("tokenizer", transformers.AutoTokenizer),
    ):
        inner = owner.from_pretrained.__func__

        def spy(cls, *args, _inner=inner, _name=name, **kwargs):
            seen[_name] = kwargs.get("revision")
            return _inner(cls, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(spy))
    _load(snapshots["llada"], revision="0123abc")
    assert seen == {"config": "0123abc", "model": "0123abc", "tokenizer": "0123abc"}
