"""Rollout engines: one small protocol, a registry, and the engines behind it.

An engine turns prompt token ids into completion token ids with the decoding options of
:class:`DecodeOptions` and takes new policy weights between calls through its own
``update_weights`` (the rollout worker's and the evaluator's
:class:`~embr_rl.core.transport.WeightClient` applies every broadcast with it; the
worker never reaches into an engine's model). It is chosen once at
set-up with :func:`build_engine` (``rollout.engine`` in the config):

- ``torch`` (:class:`actors.engines.torch_engine.TorchEngine`): the built-in PyTorch
  decoder of :mod:`actors.decoding`, CPU or GPU, any model mapping ``input_ids`` to ``logits``.
- ``vllm`` (:class:`actors.engines.vllm_engine.VLLMEngine`): diffusion models that vLLM
  serves itself; needs the ``vllm`` extra (imported only when the engine is built).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from actors.decoding import DecodeStats
from embr_rl.core.transport import TensorSpec

__all__ = [
    "DecodeOptions",
    "EngineOutput",
    "RolloutEngine",
    "build_engine",
    "engine_names",
    "register_engine",
]


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode (DESIGN §5); the fields mirror ``rollout`` / ``eval`` config keys."""

    gen_length: int = 32
    block_length: int = 8
    steps: int = 16
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    threshold: float | None = None
    cache: str | None = None
    suppress_eos: bool = False
    stop_at_eos: bool = False
    continuous_batching: bool = False

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> DecodeOptions:
        """Options from a ``RolloutConfig`` or ``EvalConfig`` (keys it lacks keep their defaults)."""
        names = cls.__dataclass_fields__
        values = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
        values.update(overrides)
        return cls(**values)


@dataclass
class EngineOutput:
    """Completions ``[N, gen_length]`` (int64, CPU, one row per prompt, in order) and their cost."""

    completion_ids: torch.Tensor
    stats: DecodeStats = field(default_factory=DecodeStats)


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions for token-id prompts; takes new weights between calls."""

    name: str

    def generate(
        self, prompts: Sequence[Sequence[int]], options: DecodeOptions, *, seed: int | None = None
    ) -> EngineOutput:
        """One completion per prompt (repeat a prompt for a group); ``seed`` fixes sampling."""
        ...

    def weight_specs(self) -> Sequence[TensorSpec] | None:
        """Names, full shapes and dtypes :meth:`update_weights` takes (None: not known here);
        the weight broadcast checks the learner's manifest against them when it connects."""
        ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load new policy weights by name, all or a subset such as a LoRA adapter (the one
        way weights reach an engine; never called while :meth:`generate` runs)."""
        ...


EngineFactory = Callable[..., RolloutEngine]
_REGISTRY: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Decorator: register ``factory(**kwargs) -> RolloutEngine`` under ``name``."""

    def deco(factory: EngineFactory) -> EngineFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_builtin_engines() -> None:
    # Importing the modules registers "torch" and "vllm" (vllm itself is imported lazily).
    importlib.import_module("actors.engines.torch_engine")
    importlib.import_module("actors.engines.vllm_engine")


def engine_names() -> list[str]:
    """Names of the registered engines."""
    _load_builtin_engines()
    return sorted(_REGISTRY)


def build_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """The engine registered as ``name``, built from ``kwargs`` (see each engine's class)."""
    _load_builtin_engines()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown rollout engine {name!r}; allowed: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name](**kwargs)
