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
    check_targets(model, lora.target_modules)
    cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    return get_peft_model(model, cfg)


def linear_names(model: nn.Module) -> set[str]:
    """The last name part of every linear layer (what peft matches ``target_modules`` on)."""
    return {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def check_targets(model: nn.Module, targets: Any) -> None:
    """Fail, naming what the model has, when a ``model.lora.target_modules`` entry matches
    no linear layer (peft would skip it silently; LLaDA, say, has no ``o_proj``)."""
    have = linear_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise ValueError(
            f"model.lora.target_modules names {missing}, which {type(model).__name__} does not "
            f"have; its linear layers are: {', '.join(sorted(have))}"
        )


def for_inference(model: nn.Module, lora: Any) -> nn.Module:
    """The model a rollout worker or evaluator decodes with: with ``lora.enabled`` it holds
    the learner's adapter structure, so the learner's adapter-only broadcasts apply."""
    return wrap_lora(model, lora).eval() if lora.enabled else model
