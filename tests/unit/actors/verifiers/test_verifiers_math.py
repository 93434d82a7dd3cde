"""Math answer extraction and equivalence, on hand-written pairs and the shared benchmarks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from actors.verifiers.math import _CHECKER, extract_answer, is_equivalent, normalize, to_number

EXTRACT = [
    (r"so \boxed{\frac{1}{2}} then \boxed{3}", "3"),
    (r"\boxed{\frac{a}{\sqrt{b}}}", r"\frac{a}{\sqrt{b}}"),
    (r"answer $\boxed 5$", "5"),
    (r"\fbox{x^{2}}", "x^{2}"),
    (r"last well-formed \boxed{7} then \boxed{8", "7"),
    ("Natalia sold 48 clips.\n#### 1,000\n", "1,000"),
    ("<reasoning>\n2+2\n</reasoning>\n<answer>\n4\n</answer>", "4"),
    ("<answer> \\boxed{9} </answer>", "9"),
    ("Adding them, the answer is 17.", "17"),
    ("So the final answer is: $x=3$. Done", "x=3"),
    ("#### 5 and later <answer>6</answer>", "5"),
    ("no answer here", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "want"), EXTRACT)
def test_extract_answer(text: str, want: str | None) -> None:
    assert extract_answer(text) == want


EQUIVALENT = [
    ("1,000", "1000"),
    ("-3", "-3.0"),
    ("+7", "7"),
    (r"\$18.00", "18"),
    ("18 dollars", "18"),
    (r"50\%", "50"),
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac{3}{4}", "0.75"),
    (r"\tfrac34", "3/4"),
    (r"3\frac{1}{2}", "3.5"),
    ("3 1/2", "7/2"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"),
    ("(1,2]", r"\left(1, 2\right]"),
    (r"\{1,2,3\}", r"\{3,2,1\}"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"\text{(B)}", "B"),
    ("x=5", "5"),
    ("y = -2", "-2"),
    ("6 - 5i", "6-5i"),
    ("x^5 - x^4", "x^4(x-1)"),
    (r"\cot x", r"\frac{\cos x}{\sin x}"),
    ("52_8", "52_{8}"),
    ("$12$", "12"),
]

NOT_EQUIVALENT = [
    ("3", "-3"),
    ("1/3", "0.333"),
    ("1001", "1000"),
    ("(1,2)", "(2,1)"),
    ("[1,2]", "(1,2]"),
    (r"2\sqrt{2}", r"\sqrt{2}"),
    (r"\pi", "3.14"),
    ("52_8", "52"),
    ("x=5", "6"),
    (r"\{1,2\}", r"\{1,2,3\}"),
    ("6+5i", "6-5i"),
    (r"\frac{1}{2}", r"\frac{2}{1}"),
    ("x^2", "x^3"),
    ("Evelyn", "Bob"),
]


@pytest.mark.parametrize(("pred", "gold"), EQUIVALENT)
def test_equivalent_pairs(pred: str, gold: str) -> None:
    assert is_equivalent(pred, gold)
    assert is_equivalent(gold, pred)


@pytest.mark.parametrize(("pred", "gold"), NOT_EQUIVALENT)
def test_not_equivalent_pairs(pred: str, gold: str) -> None:
    assert not is_equivalent(pred, gold)
    assert not is_equivalent(gold, pred)


@pytest.mark.parametrize(
    "junk",
    [
        None,
        5,
        b"5",
        [],
        "",
        "   ",
        "{{{",
        "}}}",
        r"\frac{",
        "\\",
        "\x00\xff",
        "a" * 5000,
        r"\boxed{" * 50,
    ],
)
def test_junk_is_false_and_never_raises(junk: object) -> None:
    assert is_equivalent(junk, "5") is False  # type: ignore[arg-type]
    assert is_equivalent("5", junk) is False  # type: ignore[arg-type]
    extract_answer(junk)  # type: ignore[arg-type]


@pytest.mark.integration
def test_symbolic_check_is_time_limited_and_recovers() -> None:
    before = _CHECKER.restarts
    assert not is_equivalent("9^{9^{9^{9}}}", "1", timeout_s=1.0)
    assert _CHECKER.restarts == before + 1
    assert is_equivalent(r"2\sqrt{2}", r"\sqrt{8}")


def test_to_number_exact() -> None:
    assert to_number("1,234.50") == to_number(r"\frac{2469}{2}")
    assert to_number(r"-\frac{3}{4}") == to_number("-0.75")
    assert to_number("1/0") is None
    assert to_number("x") is None
    assert normalize(r"\$ 1,000 \text{ dollars}") == "1000"


def _gsm8k_gold(shared_data: Path) -> list[str]:
    with open(shared_data / "gsm8k_test.jsonl") as fh:
        return [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in fh]


def test_gsm8k_gold_in_other_forms(shared_data: Path) -> None:
    golds = _gsm8k_gold(shared_data)
    assert len(golds) == 1319
    for gold in golds:
        n = to_number(gold)
        assert n is not None and n.denominator == 1, gold
        v = n.numerator
        forms = [
            f"{v:,}",
            f"${v}",
            f"{v}.00",
            f"{v} dollars",
            extract_answer(f"<answer>\n\\boxed{{{v}}}\n</answer>"),
            extract_answer(f"Some reasoning.\n#### {v:,}"),
        ]
        for form in forms:
            assert is_equivalent(form, gold), (form, gold)
        assert not is_equivalent(str(v + 1), gold)


_MIXED = re.compile(r"^\d+\s*\\frac")


def _math_forms(answer: str) -> list[str]:
    forms = [f"${answer}$", extract_answer(f"So the final answer is $\\boxed{{{answer}}}$.") or ""]
    styled = answer.replace(r"\frac", r"\dfrac").replace(",", ", ")
    styled = re.sub(r"(?<!\\left)\(", r"\\left(", styled)
    styled = re.sub(r"(?<!\\right)\)", r"\\right)", styled)
    forms.append(styled)
    if not _MIXED.match(answer):
        slashed = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", answer)
        if slashed != answer:
            forms.append(slashed)
    value = to_number(answer)
    if value is not None:
        forms.append(
            f"{value.numerator}.0"
            if value.denominator == 1
            else f"{value.numerator}/{value.denominator}"
        )
        if 100 % value.denominator == 0:
            forms.append(str(float(value)))
    return forms


@pytest.mark.slow
def test_math500_gold_in_other_forms(shared_data: Path) -> None:
    with open(shared_data / "math500_test.jsonl") as fh:
        answers = [json.loads(line)["answer"] for line in fh]
    assert len(answers) == 500
    failures = [(a, f) for a in answers for f in _math_forms(a) if not is_equivalent(f, a)]
    assert failures == []
    wrong = []
    for i, a in enumerate(answers):
        other = answers[(i + 1) % len(answers)]
        same = normalize(other) in (normalize(a), "x=" + normalize(a))
        if not same and is_equivalent(other, a):
            wrong.append((other, a))
    assert len(wrong) == 0, wrong
