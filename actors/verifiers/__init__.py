"""Verifiers: turn a completion into a reward (math checker, sandboxed code execution).

Pure code: no Ray, no DeepSpeed, no ``torch.distributed``. A :class:`Verifier` is chosen
once at set-up with :func:`build_verifier` (registry below) and then called per sample
through :func:`score_problem`, the one path from a task's ``Problem`` to its verifier;
:class:`actors.verifiers.pool.ProblemScorer` picks each problem's verifier by name and
:class:`actors.verifiers.pool.ScoringPool` runs many scorings concurrently, bounded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from actors.verifiers.code import CodeResult, IsolationError, SandboxLimits, resolve_mode, run_tests
from actors.verifiers.math import DEFAULT_TIMEOUT_S, extract_answer, is_equivalent
from actors.verifiers.rewards import RewardResult, get_reward

if TYPE_CHECKING:
    from embr_rl.core.tasks import Problem

__all__ = [
    "CodeResult",
    "CodeVerifier",
    "IsolationError",
    "MathVerifier",
    "RewardResult",
    "Score",
    "Verifier",
    "build_verifier",
    "extract_answer",
    "extract_code",
    "is_equivalent",
    "register_verifier",
    "run_tests",
    "score_problem",
]


@dataclass(frozen=True)
class Score:
    """One scored sample: reward, its components, an outcome label and details."""

    reward: float
    components: dict[str, float] = field(default_factory=dict)
    outcome: str = "wrong"
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Verifier(Protocol):
    """Scores a completion against a reference: a mapping (or an object such as
    ``embr_rl.core.tasks.Problem``) with ``answer`` (math) or ``test``/``tests``,
    ``entry_point`` and optionally ``prompt``/``code_prompt`` (code)."""

    name: str

    def score(self, completion: str, reference: Any) -> Score:
        """Score ``completion``; never raises on junk (returns a zero-reward score)."""
        ...


_REGISTRY: dict[str, Callable[[Any], Verifier]] = {}


def register_verifier(
    name: str,
) -> Callable[[Callable[[Any], Verifier]], Callable[[Any], Verifier]]:
    """Decorator: register a factory ``cfg -> Verifier`` under ``name``."""

    def deco(factory: Callable[[Any], Verifier]) -> Callable[[Any], Verifier]:
        _REGISTRY[name] = factory
        return factory

    return deco


def build_verifier(name: str, cfg: Any = None) -> Verifier:
    """The verifier registered as ``name`` (``math`` or ``code``), built from a
    ``VerifierConfig`` (defaults when ``cfg`` is None)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown verifier {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    if cfg is None:
        from embr_rl.core.config import VerifierConfig

        cfg = VerifierConfig()
    return _REGISTRY[name](cfg)


def score_problem(verifier: Verifier, completion: str, problem: Problem) -> Score:
    """Score ``completion`` of ``problem`` with ``verifier`` (the one ``problem.verifier``
    names). The problem itself is the reference: ``answer`` (math); ``tests``,
    ``entry_point`` and ``code_prompt`` (code). Rollouts and evaluation both score through
    here, so the reward of training and the accuracy of evaluation cannot drift apart."""
    return verifier.score(completion, problem)


def _get(reference: Any, *keys: str) -> Any:
    """First present key of a mapping (or attribute of an object such as a ``Problem``)."""
    for key in keys:
        value = (
            reference.get(key) if isinstance(reference, Mapping) else getattr(reference, key, None)
        )
        if value is not None:
            return value
    return None


def _gold_of(reference: Any) -> str | None:
    gold = _get(reference, "answer")
    if not isinstance(gold, str):
        return None
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip()
    return gold


class MathVerifier:
    """Math answers scored by a named reward preset; ``reference["answer"]`` is the gold
    answer (a GSM8K solution ending in ``#### N`` is accepted as is)."""

    name = "math"

    def __init__(self, preset: str = "correct_only", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.preset = preset
        self._reward = get_reward(preset)
        self.timeout_s = timeout_s

    def score(self, completion: str, reference: Any) -> Score:
        """Reward of ``completion`` under the preset."""
        gold = _gold_of(reference)
        if gold is None or not isinstance(completion, str):
            return Score(0.0, {}, "no_reference" if gold is None else "no_answer")
        res: RewardResult = self._reward(completion, gold, self.timeout_s)
        outcome = "correct" if res.correct else ("no_answer" if res.extracted is None else "wrong")
        return Score(res.total, dict(res.components), outcome, {"extracted": res.extracted})


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str, prompt: str = "", entry_point: str = "") -> str:
    """The program a completion stands for: its fenced code block (the last one that
    defines ``entry_point``, else the first), else the text itself; the prompt is put in
    front (HumanEval prompts hold imports and helpers, or the signature the completion
    continues)."""
    if not isinstance(completion, str):
        return ""
    blocks = _FENCE.findall(completion)
    code = completion
    if blocks:
        defining = [
            b
            for b in blocks
            if entry_point and re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b)
        ]
        code = defining[-1] if defining else blocks[0]
    if not prompt:
        return code
    if entry_point and re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        return prompt + "\n\n" + code
    return prompt + code


class CodeVerifier:
    """Programs scored by their unit tests in the sandbox; ``reference`` holds ``test``
    (or ``tests``), ``entry_point`` and optionally ``prompt`` (or ``code_prompt``, as a
    ``Problem`` has it): the trusted code the completion continues."""

    name = "code"

    def __init__(
        self,
        reward: str = "binary",
        timeout_s: float = 10.0,
        mode: str = "auto",
        require_isolation: bool = False,
        limits: SandboxLimits | None = None,
    ) -> None:
        if reward not in ("binary", "fraction"):
            raise ValueError(f"unknown code reward {reward!r}; allowed: binary, fraction")
        self.reward = reward
        self.timeout_s = timeout_s
        self.isolation = resolve_mode(mode, require_isolation)
        self.limits = limits or SandboxLimits()

    def score(self, completion: str, reference: Any) -> Score:
        """Run the program against its tests; reward 1/0 or the fraction of asserts passed."""
        test, entry = _get(reference, "test", "tests"), _get(reference, "entry_point")
        if not isinstance(test, str) or not isinstance(entry, str):
            return Score(0.0, {"tests": 0.0}, "no_reference")
        prompt = _get(reference, "prompt", "code_prompt")
        prompt = prompt if isinstance(prompt, str) else ""
        program = extract_code(completion, prompt, entry)
        res = run_tests(
            program,
            test,
            entry,
            self.timeout_s,
            prompt=prompt,
            mode=self.isolation,
            limits=self.limits,
            all_asserts=self.reward == "fraction",
        )
        reward = (
            float(res.passed) if self.reward == "binary" else (1.0 if res.passed else res.fraction)
        )
        info = {
            "status": res.status,
            "message": res.message,
            "isolation": res.isolation,
            "output": res.output,
        }
        return Score(reward, {"tests": reward}, res.status, info)


@register_verifier("math")
def _build_math(cfg: Any) -> Verifier:
    return MathVerifier(cfg.reward, cfg.math_timeout_s)


@register_verifier("code")
def _build_code(cfg: Any) -> Verifier:
    c = cfg.code
    limits = SandboxLimits(
        memory_mb=c.memory_mb,
        max_processes=c.max_processes,
        max_file_mb=c.max_file_mb,
        max_open_files=c.max_open_files,
        tmpfs_mb=c.tmpfs_mb,
        max_output_chars=c.max_output_chars,
    )
    return CodeVerifier(c.reward, c.timeout_s, c.sandbox, c.require_isolation, limits)
