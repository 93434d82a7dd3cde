"""The task interface: a problem with its prompt text, gold answer or tests, and verifier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embr_rl.core.config import TaskConfig


@dataclass(frozen=True)
class Problem:
    """One prompt of a task.

    ``answer`` is the gold final answer (math); ``tests`` and ``entry_point`` are the unit
    tests of a code problem and ``code_prompt`` the code its completion continues
    (HumanEval's prompt: imports, helpers, the signature), which the code verifier puts in
    front of the program and runs before the tests; ``solution`` is a worked solution
    (training text) when the dataset has one; ``verifier`` names the verifier that scores
    completions. The problem itself is what its verifier scores against
    (``actors.verifiers.score_problem``).
    """

    id: str
    task: str
    question: str
    answer: str | None = None
    solution: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    code_prompt: str | None = None
    verifier: str = "math"
    metadata: dict[str, Any] = field(default_factory=dict)


TaskLoader = Callable[[TaskConfig, str], list[Problem]]
_LOADERS: dict[str, TaskLoader] = {}


def register_task(name: str) -> Callable[[TaskLoader], TaskLoader]:
    """Register ``fn(cfg, split) -> list[Problem]`` as the loader of task ``name``."""

    def deco(fn: TaskLoader) -> TaskLoader:
        _LOADERS[name] = fn
        return fn

    return deco


def task_names() -> list[str]:
    return sorted(_LOADERS)


def load_task(cfg: TaskConfig, split: str) -> list[Problem]:
    """Load ``split`` of the task named by ``cfg.name`` (at most ``cfg.limit`` problems)."""
    try:
        loader = _LOADERS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown task {cfg.name!r}; allowed: {', '.join(task_names())}") from None
    problems = loader(cfg, split)
    return problems[: cfg.limit] if cfg.limit is not None else problems
