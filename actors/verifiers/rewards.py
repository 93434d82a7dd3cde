"""Named reward presets for math answers: ``correct_only``, ``d1_gsm8k``, ``d1_math``, and the
RL sanity preset ``even_answer``.

The d1 presets follow the structure of d1's reward sets (correctness worth 2.0 plus small
format terms for the ``<reasoning>``/``<answer>`` layout); every term is reported as its
own component so runs can see which part of the reward moved.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.verifiers.math import (
    DEFAULT_TIMEOUT_S,
    extract_answer,
    is_equivalent,
    tag_blocks,
    to_number,
)

CORRECT_REWARD = 2.0


@dataclass(frozen=True)
class RewardResult:
    """Total reward, its named components (summing to ``total``), and what was extracted."""

    total: float
    components: dict[str, float] = field(default_factory=dict)
    correct: bool = False
    extracted: str | None = None


RewardFn = Callable[[str, str], RewardResult]

_REASONING_THEN_ANSWER = re.compile(r"</reasoning>\s*<answer>")
_STRICT_HEAD, _STRICT_MIDDLE, _STRICT_TAIL = (
    "<reasoning>\n",
    "\n</reasoning>\n<answer>\n",
    "\n</answer>",
)


def _answer_blocks(completion: str) -> list[str]:
    return tag_blocks(completion, "<answer>", "</answer>")


def strict_format(completion: str) -> bool:
    """``re.match(r"^<reasoning>\\n.*?\\n</reasoning>\\n<answer>\\n.*?\\n</answer>\\n?$",
    completion, re.DOTALL)``, d1's strict layout, in linear time."""
    if not completion.startswith(_STRICT_HEAD):
        return False
    if completion.endswith(_STRICT_TAIL):
        tail = len(completion) - len(_STRICT_TAIL)
    elif completion.endswith(_STRICT_TAIL + "\n"):
        tail = len(completion) - len(_STRICT_TAIL) - 1
    else:
        return False
    middle = completion.find(_STRICT_MIDDLE, len(_STRICT_HEAD))
    return middle >= 0 and middle + len(_STRICT_MIDDLE) <= tail


def soft_format(completion: str) -> bool:
    """``re.search(r"<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>", completion, re.DOTALL)``,
    d1's soft layout, in linear time."""
    start = completion.find("<reasoning>")
    if start < 0:
        return False
    middle = _REASONING_THEN_ANSWER.search(completion, start + len("<reasoning>"))
    return middle is not None and completion.find("</answer>", middle.end()) >= 0


def _answer_of(completion: str, blocks: list[str] | None = None) -> str | None:
    """The answer a d1-format completion gives: inside ``<answer>`` first, else anywhere
    (``blocks``: its ``<answer>`` blocks, when the caller has them already)."""
    blocks = _answer_blocks(completion) if blocks is None else blocks
    if blocks:
        inner = extract_answer(blocks[-1])
        return inner if inner is not None else (blocks[-1].strip() or None)
    return extract_answer(completion)


def _correct(answer: str | None, gold: str, timeout_s: float) -> bool:
    return answer is not None and is_equivalent(answer, gold, timeout_s)


def _tag_score(completion: str) -> float:
    """0.125 per layout tag that appears exactly once on its own line, less 0.001 per
    character left after ``</answer>`` (at most the whole term)."""
    score = 0.0
    for tag in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>"):
        if completion.count(tag) == 1:
            score += 0.125
    if "</answer>" in completion:
        trailing = completion.split("</answer>")[-1].strip()
        score -= min(0.001 * len(trailing), score)
    return score


def correct_only(completion: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardResult:
    """1.0 when the extracted answer is equivalent to ``gold``, else 0.0."""
    if not isinstance(completion, str) or not isinstance(gold, str):
        return RewardResult(0.0, {"correct": 0.0})
    answer = extract_answer(completion)
    ok = _correct(answer, gold, timeout_s)
    return RewardResult(float(ok), {"correct": float(ok)}, ok, answer)


def d1_gsm8k(completion: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardResult:
    """Correctness 2.0, integer answer 0.5, strict layout 0.5, soft layout 0.5, tags 0.5."""
    if not isinstance(completion, str) or not isinstance(gold, str):
        return RewardResult(
            0.0, dict.fromkeys(("correct", "integer", "strict_format", "soft_format", "tags"), 0.0)
        )
    answer = _answer_of(completion)
    ok = _correct(answer, gold, timeout_s)
    value = to_number(answer) if answer is not None else None
    parts = {
        "correct": CORRECT_REWARD if ok else 0.0,
        "integer": 0.5 if value is not None and value.denominator == 1 else 0.0,
        "strict_format": 0.5 if strict_format(completion) else 0.0,
        "soft_format": 0.5 if soft_format(completion) else 0.0,
        "tags": _tag_score(completion),
    }
    return RewardResult(sum(parts.values()), parts, ok, answer)


def d1_math(completion: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardResult:
    """Correctness 2.0, one ``<answer>`` block 0.25, a ``\\boxed`` answer inside it 0.25."""
    if not isinstance(completion, str) or not isinstance(gold, str):
        return RewardResult(0.0, {"correct": 0.0, "answer_tags": 0.0, "boxed_in_answer": 0.0})
    blocks = _answer_blocks(completion)
    answer = _answer_of(completion, blocks)
    ok = _correct(answer, gold, timeout_s)
    parts = {
        "correct": CORRECT_REWARD if ok else 0.0,
        "answer_tags": 0.25 if len(blocks) == 1 else 0.0,
        "boxed_in_answer": 0.25
        if len(blocks) == 1 and re.search(r"\\(?:boxed|fbox)", blocks[0])
        else 0.0,
    }
    return RewardResult(sum(parts.values()), parts, ok, answer)


def even_answer(completion: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardResult:
    """RL sanity check: 1.0 when the extracted answer is an even integer, right or wrong.

    A base model earns it about half the time and a correct RL system drives it to ~1.0
    within a few dozen steps (``tests/integration/test_rl_sanity.py``); ``correct`` still
    reports whether the answer equals ``gold``.
    """
    if not isinstance(completion, str) or not isinstance(gold, str):
        return RewardResult(0.0, {"even": 0.0})
    answer = extract_answer(completion)
    value = to_number(answer) if answer is not None else None
    even = value is not None and value.denominator == 1 and value.numerator % 2 == 0
    return RewardResult(
        float(even), {"even": float(even)}, _correct(answer, gold, timeout_s), answer
    )


_LAST_RESULT = re.compile(r"=(-?\d+)[^=]*$")


def consistent_answer(
    completion: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> RewardResult:
    """RL sanity check: 1.0 when the boxed answer repeats the result of the last worked step
    (``...=14;\\boxed{14}``), right or wrong; ``correct`` still reports ``answer == gold``."""
    if not isinstance(completion, str) or not isinstance(gold, str):
        return RewardResult(0.0, {"consistent": 0.0})
    answer = extract_answer(completion)
    cut = completion.rfind("\\boxed")
    last = _LAST_RESULT.search(completion[:cut]) if cut > 0 else None
    ok = answer is not None and last is not None and answer.strip() == last.group(1)
    return RewardResult(
        float(ok), {"consistent": float(ok)}, _correct(answer, gold, timeout_s), answer
    )


PRESETS: dict[str, Callable[..., RewardResult]] = {
    "consistent_answer": consistent_answer,
    "even_answer": even_answer,
    "correct_only": correct_only,
    "d1_gsm8k": d1_gsm8k,
    "d1_math": d1_math,
}


def get_reward(name: str) -> Callable[..., RewardResult]:
    """The reward preset called ``name``; ``KeyError`` names the allowed presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown reward preset {name!r}; allowed: {', '.join(PRESETS)}") from None
