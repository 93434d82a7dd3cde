"""Character tokenizer and the model loader (mask token, logits check, dtype/device)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from embr_rl.core.config import BuiltinModelConfig, ModelConfig
from embr_rl.core.models import EmbrDiffusionModel
from embr_rl.core.models.loader import (
    LoadedModel,
    ModelLoadError,
    build_builtin_model,
    check_returns_logits,
    find_mask_token_id,
    find_stop_token_ids,
    load_model,
    resolve_dtype,
)
from embr_rl.core.models.tokenizer import (
    decode_completions,
    encode_completions,
    encode_prompts,
    train_char_tokenizer,
)

ALPHABET = "0123456789+-=;\\boxed{}"


@pytest.fixture
def tok():
    return train_char_tokenizer([ALPHABET])


def test_tokenizer_is_character_level_and_round_trips(tok) -> None:
    text = "12+7=19;\\boxed{19}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert {tok.pad_token_id, tok.eos_token_id, tok.mask_token_id} == {0, 1, 2}


def test_encode_prompts_left_pads(tok) -> None:
    ids, mask = encode_prompts(tok, ["1+2=", "10+20="])
    assert ids.shape == (2, 6)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
    assert (ids[0, :2] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="prompt 1 has 6 tokens"):
        encode_prompts(tok, ["1=", "10+20="], max_length=4)


def test_completion_window_eos_fill_and_decode(tok) -> None:
    win = encode_completions(tok, ["12", "3"], 4, tok.eos_token_id)
    assert win[1].tolist()[1:] == [tok.eos_token_id] * 3
    assert decode_completions(tok, win, tok.eos_token_id) == ["12", "3"]
    with pytest.raises(ValueError, match="completion 0"):
        encode_completions(tok, ["1234"], 4, tok.eos_token_id)


def _chat_tok(*extra: str):
    """The character tokenizer with end-of-turn tokens added as specials."""
    chat = train_char_tokenizer([ALPHABET])
    chat.add_special_tokens({"additional_special_tokens": list(extra)})
    return chat


def test_decode_completions_cuts_at_the_first_stop_id() -> None:
    chat = _chat_tok("<|eot_id|>")
    eot, eos = chat.convert_tokens_to_ids("<|eot_id|>"), chat.eos_token_id
    enc = chat("12", add_special_tokens=False)["input_ids"]
    rows = torch.tensor(
        [
            [*enc, eot, *enc, eos, eos],
            [*enc, eos, *enc, eot, eos],
            [*enc, *enc, *enc, eos],
        ]
    )
    assert decode_completions(chat, rows, eos, [eot]) == ["12", "12", "121212"]
    # With the EOS alone the <eot> (a special, so not printed) does not end the text.
    assert decode_completions(chat, rows, eos)[0] == "1212"
    assert decode_completions(chat, rows, None, [eot])[1] == "1212"


def test_find_stop_token_ids_takes_end_of_turn_tokens_or_the_config_list() -> None:
    chat = _chat_tok("<|eot_id|>", "<|im_end|>")
    eot, im_end = (chat.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|im_end|>"))
    eos = chat.eos_token_id
    assert find_stop_token_ids(chat) == (eos, eot, im_end)
    qwen = _chat_tok("<|im_end|>")
    assert find_stop_token_ids(qwen) == (eos, qwen.convert_tokens_to_ids("<|im_end|>"))
    assert find_stop_token_ids(train_char_tokenizer([ALPHABET])) == (eos,)
    # An explicit model.stop_token_ids replaces the search (the EOS stays first, once).
    assert find_stop_token_ids(chat, [im_end, eos, 7]) == (eos, im_end, 7)
    assert find_stop_token_ids(chat, []) == (eos,)


def test_loaded_model_stop_ids_default_to_the_eos(tok) -> None:
    kw = dict(model=None, tokenizer=tok, mask_token_id=2, pad_token_id=0, chat_template=None)
    kw |= dict(device=torch.device("cpu"), dtype=torch.float32)
    assert LoadedModel(eos_token_id=1, **kw).stop_token_ids == (1,)
    assert LoadedModel(eos_token_id=1, stop_token_ids=(1, 9), **kw).stop_token_ids == (1, 9)
    assert LoadedModel(eos_token_id=None, **kw).stop_token_ids == ()


def test_load_model_finds_stop_token_ids(tmp_path: Path) -> None:
    chat = _chat_tok("<|eot_id|>")
    eot = chat.convert_tokens_to_ids("<|eot_id|>")
    path = _save(tmp_path, chat)
    loaded = load_model(ModelConfig(path=str(path), device="cpu"))
    assert loaded.stop_token_ids == (chat.eos_token_id, eot)
    explicit = load_model(ModelConfig(path=str(path), device="cpu", stop_token_ids=[5]))
    assert explicit.stop_token_ids == (chat.eos_token_id, 5)


def _save(tmp_path: Path, tok) -> Path:
    model = build_builtin_model(
        BuiltinModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok
    )
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def test_load_model_finds_mask_token_and_resolves_dtype(tmp_path: Path, tok) -> None:
    path = _save(tmp_path, tok)
    loaded = load_model(ModelConfig(path=str(path), device="cpu"))
    assert isinstance(loaded.model, EmbrDiffusionModel)
    assert loaded.mask_token_id == tok.mask_token_id
    assert loaded.eos_token_id == tok.eos_token_id
    assert loaded.dtype == torch.float32 and not loaded.model.training
    override = load_model(ModelConfig(path=str(path), device="cpu", mask_token_id=5))
    assert override.mask_token_id == 5


def test_load_model_errors(tmp_path: Path, tok) -> None:
    with pytest.raises(ModelLoadError, match="pretrain"):
        load_model(ModelConfig(path="builtin"))
    path = _save(tmp_path, tok)
    with pytest.raises(ModelLoadError, match="outside the vocabulary"):
        load_model(ModelConfig(path=str(path), device="cpu", mask_token_id=10_000))


def test_missing_mask_token_is_a_clear_error() -> None:
    class NoMask:
        mask_token_id = None

        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, "b": 1}

    with pytest.raises(ModelLoadError, match=r"set model\.mask_token_id"):
        find_mask_token_id(object(), NoMask())  # type: ignore[arg-type]

    class LLaDALike(NoMask):
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, "<|mdm_mask|>": 7}

    assert find_mask_token_id(object(), LLaDALike()) == 7  # type: ignore[arg-type]


def test_model_without_logits_is_rejected() -> None:
    @dataclass
    class Out:
        hidden: torch.Tensor

    class NoLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Out:
            return Out(hidden=input_ids.float())

    with pytest.raises(ModelLoadError, match=r"does not return an output with \.logits"):
        check_returns_logits(NoLogits(), 0, 4)


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


REMOTE_CODE = """
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class RemoteDllmConfig(PretrainedConfig):
    model_type = "remote_dllm"

    def __init__(self, vocab_size=32, hidden=8, mask_token_id=None, **kw):
        self.vocab_size, self.hidden, self.mask_token_id = vocab_size, hidden, mask_token_id
        super().__init__(**kw)


class RemoteDllm(PreTrainedModel):
    config_class = RemoteDllmConfig

    def __init__(self, config):
        super().__init__(config)
        self.emb = torch.nn.Embedding(config.vocab_size, config.hidden)
        self.out = torch.nn.Linear(config.hidden, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kw):
        return ModelOutput(logits=self.out(self.emb(input_ids)))
"""


def _remote_code_model(tmp_path: Path, tok) -> Path:
    """A local checkpoint that, like LLaDA, ships its modelling code (auto_map)."""
    import importlib.util
    import json

    code = tmp_path / "modeling_remote.py"
    code.write_text(REMOTE_CODE)
    spec = importlib.util.spec_from_file_location("modeling_remote_for_test", code)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.RemoteDllm(mod.RemoteDllmConfig(vocab_size=len(tok), mask_token_id=None))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "modeling_remote.RemoteDllmConfig",
        "AutoModel": "modeling_remote.RemoteDllm",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_remote_code_model_needs_trust_and_then_loads(tmp_path: Path, tok) -> None:
    path = _remote_code_model(tmp_path, tok)
    with pytest.raises(ModelLoadError, match=r"model\.trust_remote_code=true"):
        load_model(ModelConfig(path=str(path), device="cpu"))
    loaded = load_model(ModelConfig(path=str(path), device="cpu", trust_remote_code=True))
    assert type(loaded.model).__name__ == "RemoteDllm"
    assert loaded.mask_token_id == tok.mask_token_id  # found through the tokenizer
