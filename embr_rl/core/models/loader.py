"""Load any masked-diffusion LM (the built-in one, LLaDA, Dream, ...) with its tokenizer.

:func:`load_model` takes a Hugging Face hub id or a local directory, resolves the device
and dtype (bf16 on GPU, fp32 on CPU unless the config says otherwise), finds the mask
token id and the chat template, and checks that the model maps ``input_ids`` to
``.logits``. LLaDA and Dream load with the project's own implementations
(:mod:`embr_rl.core.models.native`, chosen by the checkpoint's ``model_type``) and run no code
shipped with the checkpoint; other models go through transformers' Auto classes
(``model.trust_remote_code=true`` for those that ship their own code, see
:mod:`embr_rl.core.models.remote`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import cached_file

import embr_rl.core.models  # noqa: F401  (registers the built-in model with the Auto classes)
from embr_rl.core.config import BuiltinModelConfig, ModelConfig
from embr_rl.core.models.modeling import EmbrDiffusionConfig, EmbrDiffusionModel
from embr_rl.core.models.native import NATIVE_MODELS, NativeModel
from embr_rl.core.models.remote import (
    check_transformers_version,
    enable_gradient_checkpointing,
    load_remote_model,
)

log = logging.getLogger(__name__)

# Mask tokens of known dLLM families, tried in this order when neither the config nor the
# tokenizer names one: LLaDA, Dream / generic.
KNOWN_MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "<mask>", "[MASK]")
# Tokens that end a chat turn in known families (LLaDA / Llama-3, Qwen / Dream) or end a
# document; a completion stops at any of them, not only at the tokenizer's EOS.
KNOWN_STOP_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>")


class ModelLoadError(RuntimeError):
    """The model cannot be used as a masked-diffusion LM (no mask token, no logits, ...)."""


@dataclass
class LoadedModel:
    """A model ready for decoding or training, with what the rest of the system needs to know."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int
    eos_token_id: int | None
    pad_token_id: int
    chat_template: str | None
    device: torch.device
    dtype: torch.dtype
    # Ids that end a completion, the EOS first (empty: just ``eos_token_id``).
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.stop_token_ids and self.eos_token_id is not None:
            self.stop_token_ids = (int(self.eos_token_id),)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "model.device='cuda' but no CUDA device is visible; use 'cpu' or 'auto'"
        )
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on GPU, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def find_mask_token_id(
    model_config: Any, tokenizer: PreTrainedTokenizerBase, override: int | None = None
) -> int:
    """The mask token id: the config override, the model config, the tokenizer, or a known name."""
    if override is not None:
        return int(override)
    for source in (model_config, tokenizer):
        value = getattr(source, "mask_token_id", None)
        if isinstance(value, int) and value >= 0:
            return value
    vocab = tokenizer.get_vocab()
    for token in KNOWN_MASK_TOKENS:
        if token in vocab:
            return int(vocab[token])
    raise ModelLoadError(
        "cannot find a mask token: the model config and tokenizer define no mask_token_id and "
        f"the vocabulary has none of {', '.join(KNOWN_MASK_TOKENS)}; set model.mask_token_id"
    )


def find_stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, extra: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The ids that end a completion: the EOS, then ``extra`` (``model.stop_token_ids``)
    or, when that is null, every :data:`KNOWN_STOP_TOKENS` entry the vocabulary has."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if extra is not None:
        ids.extend(int(i) for i in extra)
    else:
        vocab = tokenizer.get_vocab()
        ids.extend(int(vocab[t]) for t in KNOWN_STOP_TOKENS if t in vocab)
    return tuple(dict.fromkeys(ids))


def check_returns_logits(model: torch.nn.Module, mask_token_id: int, vocab_size: int) -> None:
    """Run one tiny forward and fail clearly unless it returns ``.logits`` of shape [B, T, V]."""
    device = next(model.parameters()).device
    ids = torch.full((1, 2), mask_token_id, dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ModelLoadError(
            f"{type(model).__name__} does not return an output with .logits when called as "
            "model(input_ids=..., attention_mask=...); a masked-diffusion LM must"
        )
    if logits.dim() != 3 or logits.shape[:2] != (1, 2) or logits.shape[-1] < vocab_size:
        raise ModelLoadError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)}; expected "
            f"[batch, length, vocab>={vocab_size}]"
        )


_REMOTE_CODE_HINT = (
    "{path} ships its own modelling code (as LLaDA and Dream do); set "
    "model.trust_remote_code=true to run it"
)


def _check_remote_code(path: str, trust: bool) -> None:
    """Fail before transformers prompts on stdin when a local model needs remote code."""
    config_file = Path(path) / "config.json"
    if trust or not config_file.is_file():
        return
    try:
        auto_map = json.loads(config_file.read_text()).get("auto_map")
    except (OSError, json.JSONDecodeError):
        return
    if auto_map:
        raise ModelLoadError(_REMOTE_CODE_HINT.format(path=path))


def read_model_type(path: str, revision: str | None = None) -> str | None:
    """``model_type`` from the checkpoint's config.json (local or hub), without running its code."""
    try:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            config_file = Path(cached_file(path, "config.json", revision=revision))
        data = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    value = data.get("model_type") if isinstance(data, dict) else None
    return str(value) if value is not None else None


def choose_native(implementation: str, model_type: str | None, path: str) -> NativeModel | None:
    """The native implementation to load ``path`` with, or None for transformers' Auto classes.

    ``model.implementation``: ``auto`` takes the native one where :data:`NATIVE_MODELS` has
    the checkpoint's ``model_type``; ``native`` insists on it; ``remote`` never uses it.
    """
    if implementation == "remote":
        return None
    native = NATIVE_MODELS.get(model_type or "")
    if native is None and implementation == "native":
        raise ModelLoadError(
            f"model.implementation='native' but {path} has model_type {model_type!r}; native "
            f"implementations exist for: {', '.join(sorted(NATIVE_MODELS))}. Use "
            "model.implementation=auto or remote"
        )
    return native


def load_tokenizer(
    path: str, trust_remote_code: bool = False, config: Any = None, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub id or local directory (``config``: the model's, already
    parsed, so transformers does not parse config.json again with its own classes)."""
    kwargs: dict[str, Any] = {"config": config} if config is not None else {}
    if revision is not None:
        kwargs["revision"] = revision
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_model(
    cfg: ModelConfig, path: str | None = None, *, for_training: bool = False
) -> LoadedModel:
    """Load the model at ``path`` (default ``cfg.path``) as described by ``cfg``.

    Raises :class:`ModelLoadError` when the model has no mask token or returns no logits.
    """
    check_transformers_version()
    path = path or cfg.path
    if path == "builtin":
        raise ModelLoadError(
            "model.path='builtin' names an untrained architecture; train it with "
            "`python -m embr_rl.pretrain` or point model.path at a saved model"
        )
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    rev = cfg.revision
    model_type = read_model_type(path, rev)
    native = choose_native(cfg.implementation, model_type, path)
    if native is None:
        _check_remote_code(path, cfg.trust_remote_code)
    try:
        if native is not None:
            model_config = native.config_class.from_pretrained(path, revision=rev)
        else:
            model_config = AutoConfig.from_pretrained(
                path, trust_remote_code=cfg.trust_remote_code, revision=rev
            )
        tokenizer = load_tokenizer(
            cfg.tokenizer or path,
            cfg.trust_remote_code,
            model_config if cfg.tokenizer is None else None,
            rev if cfg.tokenizer is None else None,
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(_REMOTE_CODE_HINT.format(path=path)) from exc
        raise
    if native is not None:
        model = native.model_class.from_pretrained(
            path, config=model_config, dtype=dtype, revision=rev
        )
    else:
        model = load_remote_model(path, model_config, dtype, cfg.trust_remote_code, rev)
    mask_id = find_mask_token_id(model_config, tokenizer, cfg.mask_token_id)
    model = model.to(device)
    model.train(for_training)
    if for_training and cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    vocab_size = int(getattr(model_config, "vocab_size", 0) or len(tokenizer))
    if mask_id >= vocab_size:
        raise ModelLoadError(
            f"mask token id {mask_id} is outside the vocabulary (size {vocab_size})"
        )
    check_returns_logits(model, mask_id, min(vocab_size, len(tokenizer)))
    eos = tokenizer.eos_token_id
    pad = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else (eos if eos is not None else 0)
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        mask_token_id=mask_id,
        eos_token_id=eos,
        pad_token_id=int(pad),
        chat_template=getattr(tokenizer, "chat_template", None),
        device=device,
        dtype=dtype,
        stop_token_ids=find_stop_token_ids(tokenizer, cfg.stop_token_ids),
    )


def build_builtin_model(
    cfg: BuiltinModelConfig, tokenizer: PreTrainedTokenizerBase
) -> EmbrDiffusionModel:
    """A freshly initialised built-in model sized by ``cfg`` for ``tokenizer``'s vocabulary."""
    if tokenizer.mask_token_id is None:
        raise ModelLoadError("the tokenizer of a built-in model must define a mask token")
    config = EmbrDiffusionConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        attention_dropout=cfg.dropout,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return EmbrDiffusionModel(config)
