"""The built-in PyTorch rollout engine: :func:`actors.decoding.generate` in batches, or over
slots (``continuous_batching``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from actors.decoding import DecodeStats, generate
from actors.engines import DecodeOptions, EngineOutput, register_engine
from embr_rl.core.models.tokenizer import left_pad
from embr_rl.core.transport import (
    TensorSpec,
    adopt_named_tensors,
    load_named_tensors,
    module_weight_specs,
)


class TorchEngine:
    """Decodes with the built-in confidence-based decoder on the model's own device.

    Prompts are decoded ``max_batch_size`` at a time (the left padding of a chunk is its
    longest prompt); with ``options.continuous_batching`` all of a call's prompts share
    ``max_batch_size`` slots instead, a finished row's slot taken by the next prompt at once
    (:func:`~actors.decoding.generate` with ``slots``). ``seed`` seeds one generator per call, so a call is reproducible.
    ``eos_id`` and ``stop_ids`` (end-of-turn ids) are the stop ids of ``suppress_eos`` and
    ``stop_at_eos``; the fill after a stop is ``eos_id``.
    """

    name = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        mask_id: int,
        *,
        eos_id: int | None = None,
        stop_ids: Sequence[int] | None = None,
        pad_id: int = 0,
        max_batch_size: int = 64,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.stop_ids = tuple(int(i) for i in stop_ids or ())
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def generate(
        self, prompts: Sequence[Sequence[int]], options: DecodeOptions, *, seed: int | None = None
    ) -> EngineOutput:
        """One completion ``[gen_length]`` per prompt, in order."""
        stats = DecodeStats()
        device = self.device
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        was_training = self.model.training
        self.model.eval()
        outs: list[torch.Tensor] = []
        chunk = len(prompts) if options.continuous_batching else self.max_batch_size
        try:
            for i in range(0, len(prompts), max(chunk, 1)):
                ids, mask = left_pad(prompts[i : i + chunk], self.pad_id)
                ids, mask = ids.to(device), mask.to(device)
                out = generate(
                    self.model,
                    ids,
                    mask,
                    gen_length=options.gen_length,
                    block_length=options.block_length,
                    steps=options.steps,
                    mask_id=self.mask_id,
                    temperature=options.temperature,
                    remasking=options.remasking,
                    cfg_scale=options.cfg_scale,
                    threshold=options.threshold,
                    cache=options.cache,
                    eos_id=self.eos_id,
                    stop_ids=self.stop_ids,
                    suppress_eos=options.suppress_eos,
                    stop_at_eos=options.stop_at_eos,
                    slots=self.max_batch_size if options.continuous_batching else None,
                    generator=gen,
                    stats=stats,
                )
                outs.append(out[:, ids.shape[1] :].cpu())
        finally:
            self.model.train(was_training)
        empty = torch.empty(0, options.gen_length, dtype=torch.long)
        return EngineOutput(torch.cat(outs) if outs else empty, stats)

    def weight_specs(self) -> list[TensorSpec]:
        """The model's parameters and buffers (peft names when it holds a LoRA adapter)."""
        return module_weight_specs(self.model)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state_dict`` into the model in place by name: every weight, or a subset such
        as a LoRA adapter; an unknown name or shape fails before anything is copied."""
        load_named_tensors(self.model, state_dict)

    def adopt_weights(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Point the model's weights at ``state_dict`` (read-only shared memory) where dtype
        and device match, copy the rest; returns whether any were adopted."""
        return adopt_named_tensors(self.model, state_dict)


@register_engine("torch")
def _build_torch(
    loaded: Any = None,
    *,
    model: torch.nn.Module | None = None,
    mask_id: int | None = None,
    eos_id: int | None = None,
    stop_ids: Sequence[int] | None = None,
    pad_id: int = 0,
    max_batch_size: int = 64,
) -> TorchEngine:
    """From a ``LoadedModel`` (``loaded=``), or from ``model=`` and ``mask_id=``."""
    if loaded is not None:
        return TorchEngine(
            loaded.model,
            loaded.mask_token_id,
            eos_id=loaded.eos_token_id,
            stop_ids=loaded.stop_token_ids,
            pad_id=loaded.pad_token_id,
            max_batch_size=max_batch_size,
        )
    if model is None or mask_id is None:
        raise ValueError("the torch engine needs loaded=LoadedModel, or model= and mask_id=")
    return TorchEngine(
        model,
        mask_id,
        eos_id=eos_id,
        stop_ids=stop_ids,
        pad_id=pad_id,
        max_batch_size=max_batch_size,
    )
