"""Row factories for the buffer tests (a uniquely named module, imported by the tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pyarrow as pa

from embr_rl.core.experience import rows_from_dicts


def make_rows(
    ids: Iterable[int],
    *,
    version: int = 0,
    prompts: int = 5,
    reward: Callable[[int], float] = lambda i: float(i % 2),
    task: Callable[[int], str] = lambda i: "arith",
) -> pa.Table:
    """Rows with ids ``s<i>``, prompt ``p<i % prompts>`` and the given reward/task per id."""
    return rows_from_dicts(
        {
            "sample_id": f"s{i}",
            "prompt_id": f"p{i % prompts}",
            "prompt_ids": [1, 2, 3],
            "completion_ids": [4, 5, i % 100],
            "reward": reward(i),
            "reward_components": {"correct": reward(i)},
            "verifier_status": "ok",
            "policy_version": version,
            "group_id": f"g{i % prompts}",
            "task": task(i),
        }
        for i in ids
    )


def ids_of(table: pa.Table) -> list[int]:
    return [int(s[1:]) for s in table.column("sample_id").to_pylist()]
