"""Learner: one DeepSpeed rank (:class:`Learner`), K ranks on Ray (:class:`LearnerGroup`),
weight broadcast to rollout workers (:mod:`embr_rl.core.transport`). See ``docs/learner.md``.

Names are imported lazily: ``import embr_rl.core.transport`` (used by rollout workers) must not pull
in DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Learner": "learner.learner",
    "PolicySpec": "learner.learner",
    "init_distributed": "learner.learner",
    "shutdown_distributed": "learner.learner",
    "LearnerGroup": "embr_rl.learner_group",
    "WeightBroadcast": "embr_rl.core.transport",
    "WeightReceiver": "embr_rl.core.transport",
    "WeightClient": "embr_rl.core.transport",
    "get_broadcast": "embr_rl.core.transport",
    "to_loss_batch": "learner.batching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'learner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
