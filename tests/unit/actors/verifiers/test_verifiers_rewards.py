"""Reward presets, the Verifier registry and the bounded scoring pool."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from actors.verifiers import (
    MathVerifier,
    Score,
    Verifier,
    build_verifier,
    extract_code,
)
from actors.verifiers.pool import ScoringPool, run_many
from actors.verifiers.rewards import PRESETS, d1_gsm8k, d1_math, get_reward

STRICT = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n"


def test_d1_gsm8k_components() -> None:
    r = d1_gsm8k(STRICT, "7")
    assert r.correct and r.extracted == "7"
    assert r.components == {
        "correct": 2.0,
        "integer": 0.5,
        "strict_format": 0.5,
        "soft_format": 0.5,
        "tags": 0.5,
    }
    assert r.total == pytest.approx(4.0) == sum(r.components.values())
    wrong = d1_gsm8k(STRICT, "8")
    assert not wrong.correct and wrong.components["correct"] == 0.0
    assert wrong.total == pytest.approx(2.0)
    loose = d1_gsm8k("<reasoning>x</reasoning> <answer>7.5</answer> trailing words", "7.5")
    assert loose.components["correct"] == 2.0 and loose.components["integer"] == 0.0
    assert loose.components["strict_format"] == 0.0 and loose.components["soft_format"] == 0.5
    assert 0.0 <= loose.components["tags"] < 0.5
    plain = d1_gsm8k("so it is #### 1,000", "1000")
    assert plain.correct and plain.components["strict_format"] == 0.0


def test_d1_math_components() -> None:
    good = d1_math(
        "<reasoning>\n...\n</reasoning>\n<answer>\n\\boxed{\\dfrac{1}{2}}\n</answer>", "0.5"
    )
    assert good.components == {"correct": 2.0, "answer_tags": 0.25, "boxed_in_answer": 0.25}
    assert good.total == pytest.approx(2.5)
    bare = d1_math("The result is \\boxed{\\frac12}", "\\frac{1}{2}")
    assert bare.components == {"correct": 2.0, "answer_tags": 0.0, "boxed_in_answer": 0.0}
    wrong = d1_math("<answer>\\boxed{3}</answer>", "4")
    assert wrong.components == {"correct": 0.0, "answer_tags": 0.25, "boxed_in_answer": 0.25}


def test_correct_only_and_registry() -> None:
    assert set(PRESETS) == {
        "correct_only",
        "d1_gsm8k",
        "d1_math",
        "even_answer",
        "consistent_answer",
    }
    assert get_reward("correct_only")("\\boxed{42}", "42").total == 1.0
    assert get_reward("correct_only")("\\boxed{41}", "42").total == 0.0
    with pytest.raises(KeyError, match="allowed"):
        get_reward("nope")
    for preset in PRESETS.values():
        junk = preset(None, "1")  # type: ignore[arg-type]
        assert junk.total == 0.0 and not junk.correct


def test_sanity_presets() -> None:
    even = get_reward("even_answer")
    assert even("3+5=8;\\boxed{8}", "9").total == 1.0  # even, though wrong
    assert not even("3+5=8;\\boxed{8}", "9").correct
    assert even("\\boxed{7}", "7").total == 0.0 and even("\\boxed{7}", "7").correct
    assert even("\\boxed{2.5}", "1").total == 0.0 and even("no box", "2").total == 0.0
    consistent = get_reward("consistent_answer")
    assert consistent("9+6=16;\\boxed{16}", "15").total == 1.0
    assert consistent("9+6=15;\\boxed{16}", "15").total == 0.0
    assert consistent("\\boxed{15}", "15").total == 0.0  # no worked step to repeat


def test_math_verifier_from_config() -> None:
    from embr_rl.core.config import load_config

    cfg = load_config(None, ["verifier.reward=d1_gsm8k"])
    v = build_verifier("math", cfg.verifier)
    assert isinstance(v, Verifier) and isinstance(v, MathVerifier)
    s = v.score(STRICT, {"answer": "Janet has ... #### 7"})
    assert s.outcome == "correct" and s.reward == pytest.approx(4.0)
    assert v.score("no answer", {"answer": "7"}).outcome == "no_answer"
    assert v.score(STRICT, {}).outcome == "no_reference"
    with pytest.raises(KeyError, match="allowed"):
        build_verifier("chess")


def test_extract_code() -> None:
    prompt = "import math\n\ndef area(r):\n    '''Area.'''\n"
    fenced = "Here:\n```python\ndef area(r):\n    return math.pi * r * r\n```\nDone."
    program = extract_code(fenced, prompt, "area")
    assert program.startswith(prompt) and program.endswith("return math.pi * r * r\n")
    body = "    return math.pi * r * r\n"
    assert extract_code(body, prompt, "area") == prompt + body
    assert extract_code(None) == ""  # type: ignore[arg-type]


class _SlowVerifier:
    name = "slow"

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def score(self, completion: str, reference: Any) -> Score:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        if completion == "boom":
            raise RuntimeError("verifier bug")
        return Score(float(len(completion)), {}, "correct")


def test_pool_bounds_concurrency_and_survives_errors() -> None:
    v = _SlowVerifier()
    with ScoringPool(v, max_workers=3) as pool:
        scores = pool.score_many([("ab", {}), ("boom", {}), *[("abc", {})] * 10])
    assert [s.reward for s in scores] == [2.0, 0.0] + [3.0] * 10
    assert scores[1].outcome == "error" and "verifier bug" in scores[1].info["message"]
    assert v.peak <= 3 and pool.peak_active <= 3
    assert v.peak >= 2
    with pytest.raises(ValueError):
        ScoringPool(v, max_workers=0)


@pytest.mark.integration
def test_code_pool_scores_concurrently() -> None:
    test = "def check(candidate):\n    assert candidate(3) == 9\n"
    good = "def sq(x):\n    return x * x\n"
    bad = "def sq(x):\n    return x + x\n"
    results = run_many([(good, test, "sq"), (bad, test, "sq")] * 3, max_workers=2)
    assert [r.passed for r in results] == [True, False] * 3
    code = build_verifier("code")
    with ScoringPool(code, max_workers=2) as pool:
        futures = [
            pool.submit(f"```python\n{p}```", {"tests": test, "entry_point": "sq"})
            for p in (good, bad)
        ]
        assert [f.result().reward for f in futures] == [1.0, 0.0]


def test_linear_format_checks_agree_with_the_regexes_they_replace() -> None:
    """``strict_format``, ``soft_format`` and ``tag_blocks`` against d1's lazy regexes on
    random strings of tag pieces (the regexes are quadratic on long inputs, these are not)."""
    import random
    import re

    from actors.verifiers.math import _CLOSE_TAG, _OPEN_TAG, tag_blocks
    from actors.verifiers.rewards import soft_format, strict_format

    strict = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$", re.DOTALL)
    soft = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
    tag = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    tag_i = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
    pieces = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "<ANSWER>", "</Answer>"]
    pieces += ["\n", " ", "x", "12", "\n\n"]
    rng = random.Random(0)
    hits = {"strict": 0, "soft": 0}
    for _ in range(20000):
        t = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        if rng.random() < 0.3:
            t = "<reasoning>\n" + t
        if rng.random() < 0.3:
            t += "\n</answer>" + ("\n" if rng.random() < 0.5 else "")
        if rng.random() < 0.2:  # the layout itself, around random pieces
            t = f"<reasoning>\n{t}\n</reasoning>\n<answer>\n{t[::-1]}\n</answer>" + "\n" * (
                len(t) % 2
            )
        assert strict_format(t) == bool(strict.match(t)), t
        assert soft_format(t) == bool(soft.search(t)), t
        assert tag_blocks(t, "<answer>", "</answer>") == tag.findall(t), t
        assert tag_blocks(t, _OPEN_TAG, _CLOSE_TAG) == tag_i.findall(t), t
        hits["strict"] += strict_format(t)
        hits["soft"] += soft_format(t)
    assert hits["strict"] > 20 and hits["soft"] > 200  # both branches were exercised


MEGABYTE = 1 << 20
ADVERSARIAL = {
    "unclosed_answer_tags": "<answer>" * (MEGABYTE // 8),
    "unclosed_reasoning": "<reasoning>\n" + "\n</reasoning>\n" * (MEGABYTE // 14),
    "reasoning_openers": "<reasoning>" * (MEGABYTE // 11) + "</reasoning> <answer>",
    "boxes": "\\boxed{" * (MEGABYTE // 7),
    "nested_braces": "\\boxed{" + "{" * MEGABYTE,
    "hashes": "#### " * (MEGABYTE // 5),
    "answer_is": "the answer is " * (MEGABYTE // 14),
    "equals": "=1" * (MEGABYTE // 2) + "\\boxed{2}",
    "digits": "1" * MEGABYTE,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_every_preset_returns_on_a_megabyte_of_adversarial_text(name: str) -> None:
    """No timed assert: a quadratic path would take minutes here and hit the suite's
    per-test timeout (d1's old format regexes took over 120 s on such 1 MB inputs)."""
    from actors.verifiers.rewards import PRESETS

    text = ADVERSARIAL[name]
    for preset, fn in PRESETS.items():
        res = fn(text, "42", 1.0)
        assert isinstance(res.total, float), preset


def test_code_verifier_returns_on_a_megabyte_of_adversarial_text() -> None:
    import warnings

    from actors.verifiers import build_verifier
    from actors.verifiers.code import IsolationWarning

    ref = {"test": "def check(candidate):\n    assert candidate() == 1\n", "entry_point": "f"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        verifier = build_verifier("code")
        for text in ("```python\n" * (MEGABYTE // 10), "def f(:\n" * (MEGABYTE // 8)):
            score = verifier.score(text, ref)
            assert score.reward == 0.0 and score.outcome != "passed"


def test_collect_turns_a_stalled_scoring_into_a_timeout() -> None:
    import threading

    from actors.verifiers import Score
    from actors.verifiers.pool import ScoringPool, collect

    release = threading.Event()

    class Stalls:
        name = "stalls"

        def score(self, completion: str, reference: object) -> Score:
            if completion == "stall":
                release.wait(30)
            return Score(1.0, {}, "correct")

    pool = ScoringPool(Stalls(), max_workers=2)  # type: ignore[arg-type]
    try:
        futures = [pool.submit(c, {}) for c in ("ok", "stall", "ok")]
        scores = collect(futures, timeout_s=0.5)
        assert [s.outcome for s in scores] == ["correct", "timeout", "correct"]
        assert scores[1].reward == 0.0
    finally:
        release.set()
        pool.close()
