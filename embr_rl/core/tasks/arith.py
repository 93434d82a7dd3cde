"""A synthetic arithmetic task the project generates itself (no downloads).

Problems are chains of integer operations evaluated left to right, e.g. ``12+7-5=``,
with a worked solution ``12+7=19;19-5=14;\\boxed{14}``. Difficulty grows with the number
of operands. Train, validation and test problems come from separate seeded streams: no test
question appears in training or validation, and no validation question is an RL training
prompt (pre-training, :func:`train_stream`, excludes only the test questions, so the shipped
base models stay what they were).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from embr_rl.core.config import ArithConfig, TaskConfig
from embr_rl.core.tasks.base import Problem, register_task

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_problem(operands: list[int], ops: list[str]) -> tuple[str, str, str]:
    """Question, worked solution and answer for ``operands`` combined left to right by ``ops``.

    A ``*`` after a sum or difference gets parentheses, so the usual precedence reads the
    question the same way as the left-to-right worked solution.
    """
    if len(ops) != len(operands) - 1:
        raise ValueError("need exactly one operator between each pair of operands")
    expr, value, steps = str(operands[0]), operands[0], []
    for op, b in zip(ops, operands[1:], strict=True):
        if op == "*" and any(o in expr for o in "+-"):
            expr = f"({expr})"
        new = _APPLY[op](value, b)
        steps.append(f"{value}{op}{b}={new}")
        expr, value = f"{expr}{op}{b}", new
    return f"{expr}=", ";".join(steps) + f";\\boxed{{{value}}}", str(value)


def _stream(cfg: ArithConfig, rng: random.Random) -> Iterator[tuple[str, str, str, int]]:
    while True:
        n = rng.randint(cfg.min_operands, cfg.max_operands)
        ops = [rng.choice(cfg.ops) for _ in range(n - 1)]
        operands = [rng.randint(0, cfg.max_operand)]
        value = operands[0]
        for op in ops:
            # Without negatives, a subtrahend never exceeds the running value.
            top = (
                min(value, cfg.max_operand)
                if op == "-" and not cfg.allow_negative
                else cfg.max_operand
            )
            b = rng.randint(0, top)
            operands.append(b)
            value = _APPLY[op](value, b)
        yield (*make_problem(operands, ops), n)


def _distinct(
    stream: Iterator[tuple[str, str, str, int]], n: int, exclude: set[str]
) -> list[tuple[str, str, str, int]]:
    seen: dict[str, tuple[str, str, str, int]] = {}
    for _ in range(100 * n):
        q = next(stream)
        if q[0] not in exclude:
            seen.setdefault(q[0], q)
        if len(seen) == n:
            break
    return list(seen.values())


def held_out_questions(cfg: ArithConfig) -> list[tuple[str, str, str, int]]:
    """The held-out test problems: the first ``num_test`` distinct questions of the test stream."""
    return _distinct(_stream(cfg, random.Random(f"arith-test-{cfg.seed}")), cfg.num_test, set())


def validation_questions(cfg: ArithConfig) -> list[tuple[str, str, str, int]]:
    """The validation problems (hyper-parameter sweeps score on these, never on the test split):
    the first ``num_validation`` distinct questions of the validation stream not in the test set."""
    test = {q[0] for q in held_out_questions(cfg)}
    stream = _stream(cfg, random.Random(f"arith-validation-{cfg.seed}"))
    return _distinct(stream, cfg.num_validation, test)


def train_stream(
    cfg: ArithConfig, seed: int = 0, *, exclude_validation: bool = False
) -> Iterator[tuple[str, str, str, int]]:
    """An endless stream of training problems (question, solution, answer, operands), test
    excluded, and validation too with ``exclude_validation`` (the RL prompts)."""
    held_out = {q[0] for q in held_out_questions(cfg)}
    if exclude_validation:
        held_out |= {q[0] for q in validation_questions(cfg)}
    for q in _stream(cfg, random.Random(f"arith-train-{cfg.seed}-{seed}")):
        if q[0] not in held_out:
            yield q


def _to_problem(i: int, split: str, q: tuple[str, str, str, int]) -> Problem:
    question, solution, answer, n = q
    return Problem(
        id=f"arith-{split}-{i}",
        task="arith",
        question=question,
        answer=answer,
        solution=solution,
        verifier="math",
        metadata={"num_operands": n},
    )


@register_task("arith")
def load_arith(cfg: TaskConfig, split: str) -> list[Problem]:
    """``test``: the held-out problems; ``validation``: the sweep's problems; ``train``:
    ``num_train`` problems from the train stream, neither test nor validation questions."""
    a = cfg.arith
    if split == "test":
        return [_to_problem(i, split, q) for i, q in enumerate(held_out_questions(a))]
    if split == "validation":
        return [_to_problem(i, split, q) for i, q in enumerate(validation_questions(a))]
    if split == "train":
        stream = train_stream(a, exclude_validation=True)
        return [_to_problem(i, split, next(stream)) for i in range(a.num_train)]
    raise ValueError(
        f"unknown split {split!r} for task 'arith'; allowed: 'train', 'validation', 'test'"
    )
