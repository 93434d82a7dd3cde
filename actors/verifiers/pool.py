"""Bounded concurrent scoring: at most ``max_workers`` scorings (sandboxes) at a time, and
:class:`ProblemScorer`, which scores each problem with the verifier it names."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from actors.verifiers import Score, Verifier, build_verifier, score_problem
from actors.verifiers.code import CodeResult, run_tests

if TYPE_CHECKING:
    from embr_rl.core.tasks import Problem


class ScoringPool:
    """Scores completions with one verifier on a bounded pool of worker threads.

    Each code scoring is a sandboxed subprocess, so threads give real concurrency while the
    number of live sandboxes never exceeds ``max_workers``. ``submit`` returns at once, so
    scoring overlaps with decoding. A verifier that raises yields a zero-reward score with
    outcome ``error``; the pool keeps going.
    """

    def __init__(self, verifier: Verifier, max_workers: int = 2) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.verifier = verifier
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="embr-score")
        self._lock = threading.Lock()
        self._active = 0
        self.peak_active = 0

    def _guarded(self, scoring: Callable[[], Score]) -> Score:
        with self._lock:
            self._active += 1
            self.peak_active = max(self.peak_active, self._active)
        try:
            return scoring()
        except Exception as exc:  # the pool must outlive any one bad sample
            return Score(0.0, {}, "error", {"message": f"{type(exc).__name__}: {exc}"})
        finally:
            with self._lock:
                self._active -= 1

    def _score(self, completion: str, reference: Mapping[str, Any]) -> Score:
        return self._guarded(lambda: self.verifier.score(completion, reference))

    def submit(self, completion: str, reference: Mapping[str, Any]) -> Future[Score]:
        """Schedule one scoring; the future holds its :class:`Score`."""
        return self._executor.submit(self._score, completion, reference)

    def submit_problem(self, completion: str, problem: Problem) -> Future[Score]:
        """Schedule the :func:`~actors.verifiers.score_problem` of one completion."""
        return self._executor.submit(
            self._guarded, lambda: score_problem(self.verifier, completion, problem)
        )

    def score_many(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[Score]:
        """Score ``(completion, reference)`` pairs concurrently; results in input order."""
        futures = [self.submit(c, r) for c, r in items]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Wait for running scorings and stop the worker threads."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProblemScorer:
    """Scores completions with the verifier their problem names (``problem.verifier``).

    Verifiers come from ``verifiers`` or are built on first use with
    :func:`~actors.verifiers.build_verifier` from ``cfg`` (a ``VerifierConfig``; None:
    defaults). :meth:`score` scores in the calling thread (evaluation); :meth:`submit`
    schedules on a :class:`ScoringPool` of ``max_workers`` per verifier (rollouts). Both go
    through :func:`~actors.verifiers.score_problem`.
    """

    def __init__(
        self,
        cfg: Any = None,
        verifiers: Mapping[str, Verifier] | None = None,
        *,
        max_workers: int = 2,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.cfg = cfg
        self.max_workers = max_workers
        self._verifiers: dict[str, Verifier] = dict(verifiers or {})
        self._pools: dict[str, ScoringPool] = {}

    def verifier(self, name: str) -> Verifier:
        """The verifier called ``name`` (built from ``cfg`` on first use)."""
        if name not in self._verifiers:
            self._verifiers[name] = build_verifier(name, self.cfg)
        return self._verifiers[name]

    def score(self, completion: str, problem: Problem) -> Score:
        """Score ``completion`` of ``problem`` now, in this thread."""
        return score_problem(self.verifier(problem.verifier), completion, problem)

    def submit(self, completion: str, problem: Problem) -> Future[Score]:
        """Schedule the scoring of ``completion`` of ``problem`` on its verifier's pool; a
        verifier that raises gives a zero-reward score with outcome ``error``."""
        name = problem.verifier
        if name not in self._pools:
            self._pools[name] = ScoringPool(self.verifier(name), self.max_workers)
        return self._pools[name].submit_problem(completion, problem)

    def close(self) -> None:
        """Wait for running scorings and stop the pools."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def __enter__(self) -> ProblemScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(futures: Sequence[Future[Score]], timeout_s: float | None = None) -> list[Score]:
    """The scores of ``futures`` in order; one not done ``timeout_s`` after the call (all of
    them share the deadline) counts as outcome ``timeout`` with reward 0. Its thread cannot
    be stopped and finishes in the background; bounded extraction and the checkers' own
    limits keep that short."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out = []
    for f in futures:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out.append(f.result(timeout=left))
        except FutureTimeout:
            out.append(Score(0.0, {}, "timeout", {"message": f"not scored within {timeout_s} s"}))
    return out


def run_many(
    jobs: Sequence[tuple[str, ...]], max_workers: int = 2, **kwargs: Any
) -> list[CodeResult]:
    """:func:`run_tests` over ``(program, test, entry_point[, prompt])`` jobs, at most
    ``max_workers`` sandboxes at a time; ``kwargs`` go to ``run_tests``. Results in input
    order."""
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    with ThreadPoolExecutor(max_workers, thread_name_prefix="embr-sandbox") as ex:
        futures = [
            ex.submit(run_tests, j[0], j[1], j[2], prompt=j[3] if len(j) > 3 else "", **kwargs)
            for j in jobs
        ]
        return [f.result() for f in futures]
