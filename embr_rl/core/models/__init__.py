"""Models: the built-in masked-diffusion transformer, a loader for any Hugging Face dLLM, tokenizers."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from embr_rl.core.models.energy_head import EnergyHead
from embr_rl.core.models.modeling import (
    EmbrDiffusionConfig,
    EmbrDiffusionModel,
    EmbrDiffusionOutput,
    KVCache,
)

AutoConfig.register(EmbrDiffusionConfig.model_type, EmbrDiffusionConfig, exist_ok=True)
AutoModel.register(EmbrDiffusionConfig, EmbrDiffusionModel, exist_ok=True)
AutoModelForMaskedLM.register(EmbrDiffusionConfig, EmbrDiffusionModel, exist_ok=True)

__all__ = [
    "EmbrDiffusionConfig",
    "EmbrDiffusionModel",
    "EmbrDiffusionOutput",
    "EnergyHead",
    "KVCache",
]
