"""The sample row: one Arrow schema for the buffer, its snapshots and offline datasets.

A row is one completion of one prompt (DESIGN §3). Token ids are ``list<int32>``, reward
components a ``map<string, float64>``, times are Unix seconds (``float64``).
``policy_version < 0`` marks a row that no policy produced (an offline dataset row): it is
never stale. ``behaviour_logp`` holds the sampling policy's per-token log-probabilities of
the completion (d1's one-step estimate, ``embr_rl.core.losses.d1_token_logprobs``) when the
worker records them (``rollout.record_logprobs``), one per completion token; empty otherwise.
``mask_seed`` seeds the row's likelihood mask draws wherever it is scored (-1: none), and
``ref_energies`` holds the frozen reference's ELBO (and EUBO) on those draws, scored once by
the worker (``rollout.score_reference``; empty: not scored, the learner runs the reference).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

OFFLINE_VERSION = -1

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("reward_components", pa.map_(pa.string(), pa.float64()), nullable=False),
        pa.field("verifier_status", pa.string(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("created_at", pa.float64(), nullable=False),
        pa.field("added_at", pa.float64(), nullable=False),
        pa.field("behaviour_logp", pa.list_(pa.float32()), nullable=False),
        pa.field("mask_seed", pa.int64(), nullable=False),
        pa.field("ref_energies", pa.list_(pa.float64()), nullable=False),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SAMPLE_SCHEMA.names)
# Columns a producer may leave out; ``added_at`` is always set by the buffer.
DEFAULTED: tuple[str, ...] = (
    "reward_components",
    "verifier_status",
    "group_id",
    "created_at",
    "added_at",
    "behaviour_logp",
    "mask_seed",
    "ref_energies",
)
NO_MASK_SEED = -1
_TOKEN_COLUMNS = ("prompt_ids", "completion_ids")


class SchemaError(ValueError):
    """Rows that do not fit :data:`SAMPLE_SCHEMA`; the message names the column and row."""


def _allowed() -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in SAMPLE_SCHEMA)


def _default_column(name: str, num_rows: int, table: pa.Table, now: float) -> pa.Array:
    if name == "reward_components":
        offsets = pa.array(np.zeros(num_rows + 1, dtype=np.int32))
        empty_k = pa.array([], pa.string())
        empty_v = pa.array([], pa.float64())
        return pa.MapArray.from_arrays(offsets, empty_k, empty_v)
    if name == "verifier_status":
        return pa.array(["unknown"] * num_rows, pa.string())
    if name == "group_id":
        return table.column("prompt_id")
    if name in ("behaviour_logp", "ref_energies"):
        offsets = pa.array(np.zeros(num_rows + 1, dtype=np.int32))
        return pa.ListArray.from_arrays(
            offsets, pa.array([], SAMPLE_SCHEMA.field(name).type.value_type)
        )
    if name == "mask_seed":
        return pa.array(np.full(num_rows, NO_MASK_SEED, dtype=np.int64))
    return pa.array(np.full(num_rows, now, dtype=np.float64))


def validate(
    rows: pa.Table | pa.RecordBatch, *, fill_defaults: bool = True, now: float | None = None
) -> pa.Table:
    """Return ``rows`` as a table of exactly :data:`SAMPLE_SCHEMA`, or raise :class:`SchemaError`.

    Columns already of the right type are passed through without copying; others are cast
    (the error names the column if that fails). With ``fill_defaults`` the columns in
    :data:`DEFAULTED` may be missing. Nulls, NaN rewards and repeated ``sample_id`` values
    are rejected with the first bad row's index.
    """
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    if not isinstance(rows, pa.Table):
        raise SchemaError(
            f"rows must be a pyarrow Table or RecordBatch, got {type(rows).__name__}; "
            "use embr_rl.core.experience.rows_from_dicts for Python dicts"
        )
    extra = [c for c in rows.column_names if c not in COLUMNS]
    if extra:
        raise SchemaError(f"unknown column {extra[0]!r}; allowed columns: {_allowed()}")
    if len(set(rows.column_names)) != rows.num_columns:
        dup = next(c for c in rows.column_names if rows.column_names.count(c) > 1)
        raise SchemaError(f"column {dup!r} appears twice")
    now = time.time() if now is None else now
    n = rows.num_rows
    arrays: list[pa.ChunkedArray | pa.Array] = []
    for field in SAMPLE_SCHEMA:
        if field.name not in rows.column_names:
            if fill_defaults and field.name in DEFAULTED:
                arrays.append(_default_column(field.name, n, rows, now))
                continue
            raise SchemaError(
                f"missing column {field.name!r} ({field.type}); allowed columns: {_allowed()}"
            )
        col = rows.column(field.name)
        # Parquet renames list items ("element") and map fields; types compare equal, schemas don't.
        if col.type != field.type or str(col.type) != str(field.type):
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SchemaError(
                    f"column {field.name!r} has type {col.type}, which cannot become "
                    f"{field.type}: {str(exc).splitlines()[0]}"
                ) from None
        _check_values(field.name, col)
        arrays.append(col)
    table = pa.Table.from_arrays(arrays, schema=SAMPLE_SCHEMA)
    _check_unique_ids(table)
    return table


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _check_values(name: str, col: pa.ChunkedArray | pa.Array) -> None:
    if col.null_count:
        row = _first_true(pc.is_null(col))
        raise SchemaError(
            f"column {name!r} row {row}: null; allowed: a {SAMPLE_SCHEMA.field(name).type}"
        )
    if name in _TOKEN_COLUMNS:
        if pc.list_flatten(col).null_count:
            row = next(i for i, lst in enumerate(col.to_pylist()) if None in lst)
            raise SchemaError(f"column {name!r} row {row}: null token id; allowed: int32 ids")
    elif name == "reward":
        finite = pc.is_finite(col)
        if len(col) and not pc.all(finite).as_py():  # all() of nothing is null, not true
            row = _first_true(pc.invert(finite))
            raise SchemaError(
                f"column 'reward' row {row}: {col[row].as_py()}; allowed: a finite float"
            )


def _check_unique_ids(table: pa.Table) -> None:
    ids = table.column("sample_id")
    if len(pc.unique(ids)) == len(ids):
        return
    seen: set[str] = set()
    for row, value in enumerate(ids.to_pylist()):
        if value in seen:
            raise SchemaError(
                f"column 'sample_id' row {row}: {value!r} repeats an earlier row; "
                "allowed: a unique id per row"
            )
        seen.add(value)


def rows_from_dicts(rows: Iterable[Mapping[str, Any]], *, now: float | None = None) -> pa.Table:
    """Build a validated table from Python dicts (columns in :data:`DEFAULTED` are optional)."""
    rows = list(rows)
    present = [c for c in COLUMNS if any(c in r for r in rows)] if rows else list(COLUMNS)
    for i, r in enumerate(rows):
        unknown = [k for k in r if k not in COLUMNS]
        if unknown:
            raise SchemaError(
                f"row {i}: unknown column {unknown[0]!r}; allowed columns: {_allowed()}"
            )
    data = {}
    for c in present:
        values = [r.get(c) for r in rows]
        if c == "reward_components":
            values = [list(v.items()) if isinstance(v, Mapping) else v for v in values]
        try:
            data[c] = pa.array(values, SAMPLE_SCHEMA.field(c).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SchemaError(
                f"column {c!r}: cannot be {SAMPLE_SCHEMA.field(c).type}: {str(exc).splitlines()[0]}"
            ) from None
    return validate(pa.table(data), now=now)


def empty_table() -> pa.Table:
    """A table with :data:`SAMPLE_SCHEMA` and no rows."""
    return SAMPLE_SCHEMA.empty_table()


def token_matrix(
    table: pa.Table,
    column: str = "completion_ids",
    *,
    pad_id: float = 0,
    length: int | None = None,
    dtype: type[np.generic] = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad a list column into a ``dtype`` (token ids: ``int64``) matrix ``[rows, length]`` plus
    the row lengths.

    Vectorised over Arrow offsets (no per-row Python), so ``torch.from_numpy`` on the result
    is the learner's whole conversion cost. Rows longer than ``length`` are truncated.
    """
    col = table.column(column).combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    width = int(lengths.max(initial=0)) if length is None else length
    out = np.full((len(lengths), width), pad_id, dtype=dtype)
    if len(lengths) == 0 or width == 0:
        return out, lengths
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(len(values)) - np.repeat(starts, lengths)
    keep = pos < width
    out[rows[keep], pos[keep]] = values[keep]
    return out, lengths


def is_finite_number(value: Any) -> bool:
    """True for an int or float (not bool) that is finite (an int too large for a float is not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class PairBatch:
    """Two completions per prompt: ``first[i]`` and ``second[i]`` share ``prompt_id``."""

    first: pa.Table
    second: pa.Table
    equal_reward_share: float

    def __len__(self) -> int:
        return self.first.num_rows
