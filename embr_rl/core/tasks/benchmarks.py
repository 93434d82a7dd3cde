"""Loaders for GSM8K, MATH500 and HumanEval, from local files or the Hugging Face Hub.

With ``task.data_dir`` set, files are read from that folder (the names of
``../shared/data``: ``gsm8k_{split}.jsonl``, ``math500_test.jsonl``, ``HumanEval.jsonl.gz``);
otherwise the Hub datasets ``openai/gsm8k``, ``HuggingFaceH4/MATH-500`` and
``openai/openai_humaneval`` are loaded with ``datasets`` (``pip install embr-rl[hub]``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embr_rl.core.config import TaskConfig
from embr_rl.core.tasks.base import Problem, register_task


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file (gzip when the name ends in .gz); a bad line names its number."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def _rows(
    cfg: TaskConfig, filename: str, hub: tuple[str, str | None], split: str
) -> list[dict[str, Any]]:
    if cfg.data_dir is not None:
        path = Path(cfg.data_dir) / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"task {cfg.name!r}: {path} not found (task.data_dir={cfg.data_dir!r})"
            )
        return list(read_jsonl(path))
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"task {cfg.name!r} without task.data_dir loads from the Hugging Face Hub, which "
            "needs the 'datasets' package: pip install 'embr-rl[hub]'"
        ) from exc
    name, subset = hub
    return [dict(r) for r in datasets.load_dataset(name, subset, split=split)]


def gsm8k_final_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K solution, without thousands separators."""
    return solution.split("####")[-1].strip().replace(",", "")


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(
            f"unknown split {split!r} for task {name!r}; allowed: {', '.join(allowed)}"
        )


@register_task("gsm8k")
def load_gsm8k(cfg: TaskConfig, split: str) -> list[Problem]:
    _check_split("gsm8k", split, ("train", "test"))
    rows = _rows(cfg, f"gsm8k_{split}.jsonl", ("openai/gsm8k", "main"), split)
    return [
        Problem(
            id=f"gsm8k-{split}-{i}",
            task="gsm8k",
            question=r["question"],
            answer=gsm8k_final_answer(r["answer"]),
            solution=r["answer"],
            verifier="math",
        )
        for i, r in enumerate(rows)
    ]


@register_task("math500")
def load_math500(cfg: TaskConfig, split: str) -> list[Problem]:
    _check_split("math500", split, ("test",))
    rows = _rows(cfg, "math500_test.jsonl", ("HuggingFaceH4/MATH-500", None), "test")
    return [
        Problem(
            id=r.get("unique_id", f"math500-{i}"),
            task="math500",
            question=r["problem"],
            answer=r["answer"],
            solution=r.get("solution"),
            verifier="math",
            metadata={"subject": r.get("subject"), "level": r.get("level")},
        )
        for i, r in enumerate(rows)
    ]


@register_task("humaneval")
def load_humaneval(cfg: TaskConfig, split: str) -> list[Problem]:
    _check_split("humaneval", split, ("test",))
    rows = _rows(cfg, "HumanEval.jsonl.gz", ("openai/openai_humaneval", None), "test")
    return [
        Problem(
            id=r["task_id"],
            task="humaneval",
            question=r["prompt"],
            solution=r["prompt"] + r["canonical_solution"],
            tests=r["test"],
            entry_point=r["entry_point"],
            code_prompt=r["prompt"],
            verifier="code",
        )
        for r in rows
    ]
