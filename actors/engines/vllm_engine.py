"""Rollouts with vLLM, for the masked-diffusion models that vLLM itself serves.

Install with the ``vllm`` extra, in its own environment or image (vLLM pins its own torch
and transformers). ``vllm`` is imported only when a :class:`VLLMEngine` is built, so the
rest of the project never needs it. Confidence-based decoding then happens inside vLLM:
``gen_length`` becomes ``max_tokens``, the temperature and seed go to ``SamplingParams``,
the end-of-turn ids to its ``stop_token_ids`` (``suppress_eos`` becomes ``min_tokens``,
which holds back the EOS and those ids alike), and the diffusion options (block length,
steps, threshold, cache, remasking) travel in ``SamplingParams.extra_args`` for models
whose vLLM implementation reads them.

New policy weights go through vLLM's own loading (each served model's ``load_weights``,
which takes the checkpoint's names and does vLLM's fusing and sharding), so the engine
exposes no torch model. The names it takes are those of the model it was built from
(``weight_specs``); a LoRA adapter broadcast (``model.lora.enabled``) is refused when the
engine is built, since vLLM loads full weights only.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from actors.decoding import DecodeStats
from actors.engines import DecodeOptions, EngineOutput, register_engine
from embr_rl.core.transport import TensorSpec, module_weight_specs

WeightLoader = Callable[[Any, Mapping[str, torch.Tensor]], None]


def _import_vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(
            "rollout.engine='vllm' needs vLLM: install the 'vllm' extra "
            "(pip install 'embr-rl[vllm]') in an environment of its own, or use rollout.engine='torch'"
        ) from exc


def _apply_model_loader(llm: Any, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load weights into every vLLM worker's model through ``LLM.apply_model`` (vLLM
    versions without it: the in-process driver worker's model)."""
    items = [(k, v.detach().cpu()) for k, v in state_dict.items()]
    if hasattr(llm, "apply_model"):
        llm.apply_model(lambda model: model.load_weights(items))
        return
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    model.load_weights(items)


class VLLMEngine:
    """A :class:`~actors.engines.RolloutEngine` over ``vllm.LLM``.

    ``llm`` may be given ready-made (tests pass a fake); otherwise ``vllm.LLM(model=model,
    **llm_kwargs)`` is built. ``weight_loader(llm, state_dict)`` applies new weights; the
    default goes through ``LLM.apply_model`` and each model's ``load_weights``.
    ``weight_specs`` (checkpoint names, full shapes, dtypes) is what :meth:`weight_specs`
    reports to the weight broadcast; None leaves the names to vLLM's loader to check.
    ``stop_ids`` (end-of-turn ids, e.g. ``<|eot_id|>``) stop a completion as the EOS does;
    a completion is filled with ``eos_id`` (else ``pad_id``) to ``gen_length``.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | None = None,
        *,
        llm: Any = None,
        eos_id: int | None = None,
        stop_ids: Sequence[int] | None = None,
        pad_id: int = 0,
        weight_loader: WeightLoader | None = None,
        weight_specs: Sequence[TensorSpec] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        self._vllm = _import_vllm()
        if llm is None:
            if model is None:
                raise ValueError("VLLMEngine needs model= (a hub id or directory) or llm=")
            llm = self._vllm.LLM(model=model, **llm_kwargs)
        self.llm = llm
        self.eos_id = eos_id
        self.stop_ids = tuple(int(i) for i in stop_ids or () if i != eos_id)
        self.pad_id = pad_id
        self.weight_loader = weight_loader or _apply_model_loader
        self._weight_specs = list(weight_specs) if weight_specs is not None else None

    def _sampling_params(self, options: DecodeOptions, seed: int | None) -> Any:
        extra = {
            "block_length": options.block_length,
            "steps": options.steps,
            "remasking": options.remasking,
            "threshold": options.threshold,
            "cache": options.cache,
            "cfg_scale": options.cfg_scale,
        }
        return self._vllm.SamplingParams(
            n=1,
            temperature=options.temperature,
            max_tokens=options.gen_length,
            min_tokens=options.gen_length if options.suppress_eos else 0,
            stop_token_ids=list(self.stop_ids) or None,
            seed=seed,
            extra_args=extra,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], options: DecodeOptions, *, seed: int | None = None
    ) -> EngineOutput:
        """One completion per prompt, padded with EOS (else pad) to ``gen_length``."""
        inputs_mod = importlib.import_module("vllm.inputs")
        requests = [inputs_mod.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        stats = DecodeStats()
        t0 = time.perf_counter()
        results = self.llm.generate(requests, self._sampling_params(options, seed), use_tqdm=False)
        fill = self.eos_id if self.eos_id is not None else self.pad_id
        out = torch.full((len(prompts), options.gen_length), fill, dtype=torch.long)
        for i, res in enumerate(results):
            ids = list(res.outputs[0].token_ids)[: options.gen_length]
            if ids:
                out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        stats.wall_s = time.perf_counter() - t0
        stats.tokens_committed = out.numel()
        return EngineOutput(out, stats)

    def weight_specs(self) -> list[TensorSpec] | None:
        """The checkpoint weights vLLM's loader takes, if known (see the class)."""
        return list(self._weight_specs) if self._weight_specs is not None else None

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Push ``state_dict`` (checkpoint names, all weights or some) into the served model."""
        self.weight_loader(self.llm, state_dict)


@register_engine("vllm")
def _build_vllm(
    loaded: Any = None,
    *,
    model: str | None = None,
    max_batch_size: int | None = None,
    **kwargs: Any,
) -> VLLMEngine:
    """From ``model=`` (hub id or directory) or a ``LoadedModel``'s ``name_or_path``; a
    ``LoadedModel`` also gives the weight names (it must not hold a LoRA adapter)."""
    if loaded is not None:
        if getattr(loaded.model, "peft_config", None) is not None:
            raise ValueError(
                "rollout.engine='vllm' loads full weights only, but model.lora.enabled=true "
                "makes the learner broadcast the LoRA adapter alone; use rollout.engine='torch' "
                "or model.lora.enabled=false"
            )
        if model is None:
            model = getattr(getattr(loaded.model, "config", None), "name_or_path", None)
        kwargs.setdefault("eos_id", loaded.eos_token_id)
        kwargs.setdefault("stop_ids", loaded.stop_token_ids)
        kwargs.setdefault("pad_id", loaded.pad_token_id)
        kwargs.setdefault("weight_specs", module_weight_specs(loaded.model))
    if max_batch_size is not None:
        kwargs.setdefault("max_num_seqs", max_batch_size)
    return VLLMEngine(model, **kwargs)
