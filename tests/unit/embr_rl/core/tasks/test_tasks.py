"""Task loaders (shared benchmark files), the synthetic task, prompt formats."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from embr_rl.core.config import ArithConfig, TaskConfig
from embr_rl.core.tasks import D1_SYSTEM_PROMPT, format_prompt, load_task, task_names
from embr_rl.core.tasks.arith import held_out_questions, make_problem, train_stream
from embr_rl.core.tasks.benchmarks import gsm8k_final_answer, read_jsonl


def _cfg(name: str, data_dir: Path | None = None, **kw: object) -> TaskConfig:
    return TaskConfig(name=name, data_dir=None if data_dir is None else str(data_dir), **kw)


@pytest.mark.parametrize(("name", "rows"), [("gsm8k", 1319), ("math500", 500), ("humaneval", 164)])
def test_shared_test_sets_load_in_full(shared_data: Path, name: str, rows: int) -> None:
    problems = load_task(_cfg(name, shared_data), "test")
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows
    for p in problems:
        assert p.task == name and p.question
        if name == "humaneval":
            assert p.verifier == "code" and p.tests and p.entry_point and p.answer is None
            assert p.code_prompt == p.question and (p.solution or "").startswith(p.code_prompt)
        else:
            assert p.verifier == "math" and p.answer


def test_gsm8k_answers_are_numbers(shared_data: Path) -> None:
    problems = load_task(_cfg("gsm8k", shared_data), "test")
    assert problems[0].answer == "18"
    assert all(re.fullmatch(r"-?[0-9.]+", p.answer or "") for p in problems)
    assert gsm8k_final_answer("so 1,234 in all\n#### 1,234") == "1234"
    assert len(load_task(_cfg("gsm8k", shared_data), "train")) == 7473


def test_limit_and_bad_split_and_missing_file(shared_data: Path, tmp_path: Path) -> None:
    assert len(load_task(_cfg("math500", shared_data, limit=7), "test")) == 7
    with pytest.raises(ValueError, match="unknown split 'train' for task 'math500'"):
        load_task(_cfg("math500", shared_data), "train")
    with pytest.raises(FileNotFoundError, match=r"gsm8k_test\.jsonl not found"):
        load_task(_cfg("gsm8k", tmp_path), "test")


def test_bad_jsonl_names_line(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2"):
        list(read_jsonl(f))


def test_registry_lists_all_tasks() -> None:
    assert {"arith", "gsm8k", "math500", "humaneval"} <= set(task_names())


@pytest.mark.parametrize(
    ("operands", "ops"),
    [
        ([12, 7, 5], ["+", "-"]),
        ([3, 9], ["-"]),
        ([4, 5, 6], ["+", "*"]),
        ([2, 3, 4, 5], ["*", "-", "*"]),
    ],
)
def test_make_problem_matches_python_arithmetic(operands: list[int], ops: list[str]) -> None:
    question, solution, answer = make_problem(operands, ops)
    assert eval(question.rstrip("=")) == int(answer)  # the question reads as the chain computes
    assert solution.endswith(f"\\boxed{{{answer}}}")


def test_synthetic_answers_correct_by_construction() -> None:
    cfg = TaskConfig(
        name="arith", arith=ArithConfig(num_train=2000, num_test=300, ops=["+", "-", "*"])
    )
    for p in load_task(cfg, "train") + load_task(cfg, "test"):
        assert eval(p.question.rstrip("=")) == int(p.answer)
        steps = p.solution.split(";")
        assert steps[-1] == f"\\boxed{{{p.answer}}}"
        assert len(steps) - 1 == p.metadata["num_operands"] - 1
        for step in steps[:-1]:  # every worked step is itself correct
            lhs, rhs = step.split("=")
            m = re.fullmatch(r"(-?\d+)([+\-*])(\d+)", lhs)
            assert m, step
            a, op, b = int(m[1]), m[2], int(m[3])
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == int(rhs)


def test_split_is_seeded_and_disjoint() -> None:
    a = ArithConfig(num_test=200)
    test_q = {q[0] for q in held_out_questions(a)}
    assert len(test_q) == 200
    stream = train_stream(a)
    train_q = [next(stream)[0] for _ in range(5000)]
    assert not test_q & set(train_q)
    assert [q[0] for q in held_out_questions(a)] == [q[0] for q in held_out_questions(a)]
    other = {q[0] for q in held_out_questions(dataclasses.replace(a, seed=a.seed + 1))}
    assert other != test_q


def test_validation_split_is_disjoint_from_test_and_from_rl_prompts() -> None:
    task = TaskConfig(
        name="arith", arith=ArithConfig(num_train=3000, num_test=200, num_validation=150)
    )
    val = load_task(task, "validation")
    test = load_task(task, "test")
    train = load_task(task, "train")
    val_q = {p.question for p in val}
    assert len(val) == len(val_q) == 150
    assert all(p.id.startswith("arith-validation-") for p in val)
    assert not val_q & {p.question for p in test}
    assert not val_q & {p.question for p in train}
    assert [p.question for p in load_task(task, "validation")] == [p.question for p in val]
    # Pre-training's stream excludes only the test questions (the shipped base models' data).
    stream = train_stream(task.arith)
    assert val_q & {next(stream)[0] for _ in range(20000)}
    with pytest.raises(ValueError, match="allowed: 'train', 'validation', 'test'"):
        load_task(task, "dev")


def test_difficulty_by_operand_count() -> None:
    cfg = TaskConfig(name="arith", arith=ArithConfig(min_operands=4, max_operands=4, num_test=50))
    assert {p.metadata["num_operands"] for p in load_task(cfg, "test")} == {4}


def test_prompt_formats(shared_data: Path) -> None:
    p = load_task(_cfg("gsm8k", shared_data, limit=1), "test")[0]
    assert format_prompt(p, "plain") == p.question
    d1 = format_prompt(p, "d1")
    assert d1.startswith(D1_SYSTEM_PROMPT) and d1.endswith(p.question)
    assert "<answer>" in d1 and "<reasoning>" in d1
    with pytest.raises(ValueError, match="allowed: 'plain', 'd1'"):
        format_prompt(p, "chatml")


def test_llada_chat_template_is_applied() -> None:
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token="<|startoftext|>",
    )
    p = load_task(TaskConfig(name="arith", arith=ArithConfig(num_test=1)), "test")[0]
    text = format_prompt(p, "plain", tok, chat_template=True)
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
        f"{p.question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _intermediates(solution: str) -> list[int]:
    return [int(step.split("=")[1]) for step in solution.split(";")[:-1]]


def test_chains_stay_non_negative_unless_allowed() -> None:
    base = ArithConfig(num_train=3000, num_test=100)
    values = [
        v
        for p in load_task(TaskConfig(name="arith", arith=base), "train")
        for v in _intermediates(p.solution)
    ]
    assert min(values) >= 0
    signed = dataclasses.replace(base, allow_negative=True)
    values = [
        v
        for p in load_task(TaskConfig(name="arith", arith=signed), "train")
        for v in _intermediates(p.solution)
    ]
    assert min(values) < 0


def test_encode_problems_gives_texts_and_ids_and_names_an_overlong_prompt() -> None:
    from embr_rl.core.models.tokenizer import train_char_tokenizer
    from embr_rl.core.tasks.prompts import encode_problems

    tok = train_char_tokenizer(["0123456789+-=;\\boxed{}"])
    problems = load_task(TaskConfig(name="arith", arith=ArithConfig(num_test=3)), "test")
    texts, ids = encode_problems(problems, tok, "plain")
    assert texts == [p.question for p in problems]
    assert [len(i) for i in ids] == [len(p.question) for p in problems]
    with pytest.raises(ValueError, match=rf"problem 0 \({problems[0].id}\) has \d+ prompt tokens"):
        encode_problems(problems, tok, "plain", max_length=2)
