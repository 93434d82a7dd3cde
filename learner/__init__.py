"""Learner: one DeepSpeed rank (:class:`Learner`), K ranks on Ray (:class:`LearnerGroup`),
weight broadcast to rollout workers (:mod:`learner.sync`). See ``docs/learner.md``.

Names are imported lazily: ``import learner.sync`` (used by rollout workers) must not pull
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
    "LearnerGroup": "learner.group",
    "WeightBroadcast": "learner.sync",
    "WeightReceiver": "learner.sync",
    "WeightSyncClient": "learner.sync",
    "get_broadcast": "learner.sync",
    "to_loss_batch": "learner.batching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'learner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
