"""LoRA adapters (peft) with the settings of ``model.lora``: the learner trains them, and
rollout workers and the evaluator hold the same adapter so the broadcast's names match."""

from __future__ import annotations

from typing import Any

from torch import nn


def wrap_lora(model: nn.Module, lora: Any) -> nn.Module:
    """``model`` with a fresh peft LoRA adapter (``lora``: a ``LoraConfig`` of the schema)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is in the dev and lora extras
        raise ImportError(
            "model.lora.enabled=true needs peft: pip install 'embr-rl[lora]'"
        ) from exc
    cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    return get_peft_model(model, cfg)


def for_inference(model: nn.Module, lora: Any) -> nn.Module:
    """The model a rollout worker or evaluator decodes with: with ``lora.enabled`` it holds
    the learner's adapter structure, so the learner's adapter-only broadcasts apply."""
    return wrap_lora(model, lora).eval() if lora.enabled else model
