"""A resumable stream of training prompts: seeded shuffled epochs over a task's train split.

The driver takes prompts in order with :meth:`PromptStream.take`; ``position`` (prompts
handed out so far) is all a checkpoint needs to continue the same sequence, because epoch
``e``'s order is a pure function of ``(seed, e)``. Prompts handed out but never used (a
worker died mid-batch) go back with :meth:`give_back` and come out first next time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from embr_rl.core.tasks.base import Problem


class PromptStream:
    """Endless prompts from ``problems``: epoch ``e`` is the permutation seeded by ``(seed, e)``."""

    def __init__(self, problems: Sequence[Problem], seed: int = 0, position: int = 0) -> None:
        if not problems:
            raise ValueError(
                "the prompt stream needs at least one problem (the train split is empty)"
            )
        self.problems = list(problems)
        self.seed = seed
        self.position = position
        self._returned: deque[int] = deque()
        self._epoch = -1
        self._order = np.zeros(0, np.int64)
        self._by_id: dict[str, int] | None = None

    def _index_of(self, problem_id: str) -> int | None:
        if self._by_id is None:  # built on first need: only failures and resumes use it
            self._by_id = {p.id: i for i, p in enumerate(self.problems)}
        return self._by_id.get(problem_id)

    def _index(self, k: int) -> int:
        n = len(self.problems)
        epoch, offset = divmod(k, n)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._epoch = epoch
        return int(self._order[offset])

    @property
    def epoch(self) -> int:
        """Completed passes over the problems."""
        return self.position // len(self.problems)

    def take(self, n: int) -> list[Problem]:
        """The next ``n`` prompts (returned ones first)."""
        out: list[Problem] = []
        while self._returned and len(out) < n:
            out.append(self.problems[self._returned.popleft()])
        while len(out) < n:
            out.append(self.problems[self._index(self.position)])
            self.position += 1
        return out

    def give_back(self, problems: Sequence[Problem]) -> None:
        """Return prompts that were taken but not used; they come out first on the next take."""
        found = (self._index_of(p.id) for p in problems)
        self._returned.extend(i for i in found if i is not None)

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores (returned prompts are kept by id so none is skipped)."""
        return {
            "position": self.position,
            "seed": self.seed,
            "returned": [self.problems[i].id for i in self._returned],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state` of a stream over the same problems."""
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        found = (self._index_of(i) for i in state.get("returned", []))
        self._returned = deque(i for i in found if i is not None)
