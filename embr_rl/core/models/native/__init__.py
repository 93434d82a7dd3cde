"""The project's own implementations of hub dLLM families, chosen by ``model_type``.

Each reads the checkpoint's config.json and safetensors under their own parameter names,
runs no code shipped with the checkpoint, and speaks the interface the rest of the system
uses (see :mod:`embr_rl.core.models.modeling`): ``forward(input_ids, attention_mask,
position_ids, kv_cache, use_cache)`` returning position-aligned ``.logits``
(``logits[:, i]`` scores token ``i``) and, on request, a :class:`~embr_rl.core.models.KVCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedModel

from embr_rl.core.models.native.dream import DreamNativeConfig, DreamNativeModel
from embr_rl.core.models.native.llada import LLaDANativeConfig, LLaDANativeModel


@dataclass(frozen=True)
class NativeModel:
    """A native implementation: its config class (parsing the hub config.json) and model class."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]


# model_type as written in the checkpoint's config.json -> implementation.
NATIVE_MODELS: dict[str, NativeModel] = {
    "llada": NativeModel(LLaDANativeConfig, LLaDANativeModel),
    "Dream": NativeModel(DreamNativeConfig, DreamNativeModel),
}

__all__ = [
    "NATIVE_MODELS",
    "DreamNativeConfig",
    "DreamNativeModel",
    "LLaDANativeConfig",
    "LLaDANativeModel",
    "NativeModel",
]
