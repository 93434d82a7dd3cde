"""The sample row schema and its validation messages."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embr_rl.core.experience import (
    SAMPLE_SCHEMA,
    SchemaError,
    rows_from_dicts,
    token_matrix,
    validate,
)


def _base(n: int = 3) -> dict[str, pa.Array]:
    return {
        "sample_id": pa.array([f"s{i}" for i in range(n)]),
        "prompt_id": pa.array(["p"] * n),
        "prompt_ids": pa.array([[1, 2]] * n, pa.list_(pa.int32())),
        "completion_ids": pa.array([[3, 4, 5]] * n, pa.list_(pa.int32())),
        "reward": pa.array([0.0, 1.0, 0.5][:n]),
        "policy_version": pa.array([0] * n, pa.int64()),
        "task": pa.array(["arith"] * n),
    }


def test_minimal_table_gets_defaults_and_exact_schema() -> None:
    table = validate(pa.table(_base()), now=123.0)
    assert table.schema.equals(SAMPLE_SCHEMA)
    assert table.column("verifier_status").to_pylist() == ["unknown"] * 3
    assert table.column("group_id").to_pylist() == ["p"] * 3
    assert table.column("created_at").to_pylist() == [123.0] * 3
    assert table.column("reward_components").to_pylist() == [[], [], []]


def test_record_batch_is_accepted_and_matching_columns_are_not_copied() -> None:
    batch = pa.RecordBatch.from_pydict(_base())
    table = validate(batch)
    src = batch.column(batch.schema.get_field_index("completion_ids"))
    out = table.column("completion_ids").chunk(0)
    assert out.buffers()[-1].address == src.buffers()[-1].address


def test_missing_column_is_named() -> None:
    data = _base()
    del data["reward"]
    with pytest.raises(SchemaError, match=r"missing column 'reward' \(double\)"):
        validate(pa.table(data))


def test_missing_defaulted_column_fails_when_defaults_are_off() -> None:
    with pytest.raises(SchemaError, match="missing column 'reward_components'"):
        validate(pa.table(_base()), fill_defaults=False)


def test_unknown_column_is_named_with_the_allowed_ones() -> None:
    data = _base()
    data["rewrd"] = pa.array([1.0, 2.0, 3.0])
    with pytest.raises(SchemaError, match=r"unknown column 'rewrd'; allowed columns: sample_id"):
        validate(pa.table(data))


def test_uncastable_type_names_the_column() -> None:
    data = _base()
    data["reward"] = pa.array(["high", "low", "x"])
    with pytest.raises(
        SchemaError, match=r"column 'reward' has type string, which cannot become double"
    ):
        validate(pa.table(data))


def test_castable_type_is_cast() -> None:
    data = _base()
    data["policy_version"] = pa.array([1, 2, 3], pa.int8())
    data["completion_ids"] = pa.array([[1], [2], [3]], pa.list_(pa.int64()))
    table = validate(pa.table(data))
    assert table.column("policy_version").type == pa.int64()
    assert table.column("completion_ids").type == pa.list_(pa.int32())


def test_null_is_reported_with_column_and_row() -> None:
    data = _base()
    data["prompt_id"] = pa.array(["p", None, "p"])
    with pytest.raises(SchemaError, match=r"column 'prompt_id' row 1: null"):
        validate(pa.table(data))


def test_null_token_id_is_reported_with_its_row() -> None:
    data = _base()
    data["completion_ids"] = pa.array([[1], [2], [3, None]], pa.list_(pa.int32()))
    with pytest.raises(SchemaError, match=r"column 'completion_ids' row 2: null token id"):
        validate(pa.table(data))


def test_nan_reward_is_rejected_with_its_row() -> None:
    data = _base()
    data["reward"] = pa.array([0.0, 1.0, float("nan")])
    with pytest.raises(SchemaError, match=r"column 'reward' row 2: nan; allowed: a finite float"):
        validate(pa.table(data))


def test_repeated_sample_id_is_rejected() -> None:
    data = _base()
    data["sample_id"] = pa.array(["a", "b", "a"])
    with pytest.raises(SchemaError, match=r"column 'sample_id' row 2: 'a' repeats"):
        validate(pa.table(data))


def test_not_a_table_is_rejected() -> None:
    with pytest.raises(SchemaError, match="pyarrow Table or RecordBatch, got list"):
        validate([{"sample_id": "x"}])  # type: ignore[arg-type]


def test_rows_from_dicts_round_trip_and_bad_value() -> None:
    table = rows_from_dicts(
        [
            {
                "sample_id": "a",
                "prompt_id": "p",
                "prompt_ids": [1],
                "completion_ids": [2, 3],
                "reward": 2.0,
                "reward_components": {"correct": 2.0, "format": 0.5},
                "policy_version": 7,
                "task": "gsm8k",
            }
        ]
    )
    assert table.column("reward_components").to_pylist() == [[("correct", 2.0), ("format", 0.5)]]
    with pytest.raises(SchemaError, match=r"row 0: unknown column 'bogus'"):
        rows_from_dicts([{"sample_id": "a", "bogus": 1}])
    with pytest.raises(SchemaError, match=r"column 'reward': cannot be double"):
        rows_from_dicts([{**table.to_pylist()[0], "reward": "abc"}])


def test_token_matrix_pads_and_truncates() -> None:
    table = validate(
        pa.table(
            {
                **_base(3),
                "completion_ids": pa.array([[5], [6, 7, 8], []], pa.list_(pa.int32())),
            }
        )
    )
    ids, lengths = token_matrix(table, pad_id=-1)
    np.testing.assert_array_equal(ids, [[5, -1, -1], [6, 7, 8], [-1, -1, -1]])
    np.testing.assert_array_equal(lengths, [1, 3, 0])
    ids2, _ = token_matrix(table, length=2, pad_id=0)
    np.testing.assert_array_equal(ids2, [[5, 0], [6, 7], [0, 0]])
    assert ids.dtype == np.int64
