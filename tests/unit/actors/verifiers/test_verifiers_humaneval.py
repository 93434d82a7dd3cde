"""All 164 HumanEval canonical solutions pass the sandbox; wrong variants of each fail."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from actors.verifiers.code import IsolationWarning
from actors.verifiers.pool import run_many

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PERTURB = """

_embr_original = {entry}


def {entry}(*args, **kwargs):
    out = _embr_original(*args, **kwargs)
    if isinstance(out, bool):
        return not out
    if isinstance(out, (int, float)):
        return out + 1
    if isinstance(out, str):
        return out + "?"
    if isinstance(out, (list, tuple)):
        return type(out)(list(out) + [None])
    if isinstance(out, dict):
        return {{**out, "__extra__": 1}}
    return 1
"""


@pytest.fixture(scope="module")
def humaneval(shared_data: Path) -> list[dict[str, Any]]:
    with gzip.open(shared_data / "HumanEval.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 164
    return rows


def _run_all(jobs: list[tuple[str, ...]]) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        return run_many(jobs, max_workers=2, timeout_s=10.0)


def test_all_canonical_solutions_pass(humaneval: list[dict[str, Any]]) -> None:
    jobs = [
        (r["prompt"] + r["canonical_solution"], r["test"], r["entry_point"], r["prompt"])
        for r in humaneval
    ]
    results = _run_all(jobs)
    failed = [
        (r["task_id"], x.status, x.message)
        for r, x in zip(humaneval, results, strict=True)
        if not x.passed
    ]
    assert failed == []
    assert all(x.asserts_total >= 1 for x in results)


def test_wrong_variants_fail(humaneval: list[dict[str, Any]]) -> None:
    jobs = []
    for r in humaneval:
        canonical = r["prompt"] + r["canonical_solution"]
        jobs.append((r["prompt"] + "    return None\n", r["test"], r["entry_point"], r["prompt"]))
        jobs.append(
            (
                canonical + PERTURB.format(entry=r["entry_point"]),
                r["test"],
                r["entry_point"],
                r["prompt"],
            )
        )
    results = _run_all(jobs)
    constant_passed = [r["task_id"] for i, r in enumerate(humaneval) if results[2 * i].passed]
    perturbed_passed = [r["task_id"] for i, r in enumerate(humaneval) if results[2 * i + 1].passed]
    assert constant_passed == []
    assert perturbed_passed == []
    assert {x.status for x in results} <= {"failed", "error"}
