"""Offline datasets as buffer rows: scored samples or preference pairs, from JSONL or Parquet.

Two shapes (``shape="auto"`` tells them apart by their fields):

- scored: ``{"prompt": str, "completion": str, "reward": number}``, one row each;
- pairs: ``{"prompt": str, "chosen": str, "rejected": str}``, two rows sharing a
  ``group_id``, with rewards 1.0 (chosen) and 0.0 (rejected).

Optional fields: ``prompt_id``, ``sample_id``, ``task``, and (scored) ``reward_components``
(name -> number). Rows get ``policy_version = -1`` (offline: never stale) and
``verifier_status = "offline"``. A malformed row is reported as ``line N`` (JSONL, from 1)
or ``row N`` (Parquet, from 0): ``strict`` raises, otherwise the row is skipped and counted.

Tokenisation is cached in memory (repeated prompts are encoded once) and on disk: the
tokenised table is stored as Parquet keyed by the dataset's bytes, the options and a
fingerprint of the tokenizer, so a second load of the same file skips the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from buffer.storage import ParquetStorage, write_atomic
from embr_rl.core.experience import OFFLINE_VERSION, SAMPLE_SCHEMA, is_finite_number, validate

log = logging.getLogger(__name__)

SHAPES = {"scored": ("prompt", "completion", "reward"), "pairs": ("prompt", "chosen", "rejected")}
SUFFIXES = (".jsonl", ".json", ".parquet")
_PROBE = "The quick brown fox: 12+7=19; 19-5=14. \\boxed{14} #### 14"
_CACHE_VERSION = 1
# A record longer than this (one JSON line) is malformed, not a prompt: 1 MiB is ~250k tokens.
MAX_LINE_BYTES = 1 << 20
_ALLOWED = "scored (prompt, completion, reward) or pairs (prompt, chosen, rejected)"


class OfflineDatasetError(ValueError):
    """A malformed offline dataset; the message names the file and the line or row."""


@dataclass
class OfflineDataset:
    """The rows of an offline dataset, ready for ``ExperienceBuffer.add``."""

    table: pa.Table
    shape: str
    records: int
    skipped: int
    errors: list[str] = field(default_factory=list)
    cache_hit: bool = False


def make_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Turn a tokenizer into ``text -> ids``.

    Accepts an object with ``encode`` (Hugging Face tokenizers are called with
    ``add_special_tokens=False``) or a callable returning ids or a mapping with
    ``input_ids``.
    """
    if hasattr(tokenizer, "encode"):
        try:
            tokenizer.encode("a", add_special_tokens=False)
        except TypeError:
            return lambda text: list(tokenizer.encode(text))
        return lambda text: list(tokenizer.encode(text, add_special_tokens=False))
    if callable(tokenizer):

        def encode(text: str) -> list[int]:
            out = tokenizer(text)
            if isinstance(out, Mapping) or hasattr(out, "keys"):
                out = out["input_ids"]
            return list(out)

        return encode
    raise TypeError(
        f"tokenizer must have .encode(text) or be callable, got {type(tokenizer).__name__}"
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's identity and of its encoding of a fixed probe text."""
    encode = make_encoder(tokenizer)
    ident = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    ident += f"|{getattr(tokenizer, 'name_or_path', '')}|{encode(_PROBE)}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _records(path: Path) -> tuple[Iterator[tuple[str, Any]], list[str] | None]:  # noqa: C901  (one skip reason per kind of bad line)
    """``(where, record)`` pairs, plus the column names when the file has a schema."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)

        def rows() -> Iterator[tuple[str, Any]]:
            for i, rec in enumerate(table.to_pylist()):
                yield f"row {i}", rec

        return rows(), table.column_names

    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # one JSON array of records, not JSON lines
        try:
            items = json.loads(path.read_bytes())
        except (UnicodeDecodeError, ValueError) as exc:
            raise OfflineDatasetError(
                f"{path}: starts with '[' but is not a JSON array of records ({exc}); allowed: "
                "JSON lines (one record per line), a JSON array of records, or Parquet"
            ) from None
        if not isinstance(items, list):
            raise OfflineDatasetError(f"{path}: not a JSON array of records")

        def elements() -> Iterator[tuple[str, Any]]:
            for i, rec in enumerate(items):
                yield f"item {i}", rec

        return elements(), None

    def lines() -> Iterator[tuple[str, Any]]:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"line {number}"
                if len(raw) > MAX_LINE_BYTES:
                    yield (
                        where,
                        _BadJson(f"a line of {len(raw):,} bytes; the limit is {MAX_LINE_BYTES:,}"),
                    )
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield where, _BadJson(f"not UTF-8: byte {raw[exc.start]:#04x} at {exc.start}")
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except (ValueError, RecursionError) as exc:
                    yield where, _BadJson(f"{type(exc).__name__}: {exc}"[:300])

    return lines(), None


@dataclass
class _BadJson:
    message: str


def _detect(first: Any, columns: list[str] | None) -> str | None:
    keys = set(columns) if columns is not None else set(first) if isinstance(first, dict) else set()
    if {"chosen", "rejected"} <= keys:
        return "pairs"
    if {"completion", "reward"} <= keys:
        return "scored"
    return None


def _check(rec: Any, shape: str) -> str | None:
    """Why ``rec`` is not a valid record of ``shape`` (None when it is)."""
    if isinstance(rec, _BadJson):
        return f"invalid JSON ({rec.message})"
    if not isinstance(rec, dict):
        return (
            f"expected an object with fields {', '.join(SHAPES[shape])}, got {type(rec).__name__}"
        )
    for name in SHAPES[shape]:
        if name not in rec or rec[name] is None:
            return f"missing field {name!r}; the {shape} shape needs {', '.join(SHAPES[shape])}"
    for name in SHAPES[shape]:
        value = rec[name]
        if name == "reward":
            if not is_finite_number(value):
                return f"field 'reward' must be a finite number, got {value!r}"
        elif not isinstance(value, str):
            return f"field {name!r} must be a string, got {type(value).__name__}"
    for name in ("prompt_id", "sample_id", "task"):
        value = rec.get(name)
        if value is not None and not isinstance(value, str | int):
            return f"field {name!r} must be a string or an integer, got {type(value).__name__}"
    comps = rec.get("reward_components")
    if comps is not None and (
        not isinstance(comps, dict)
        or not all(isinstance(k, str) and is_finite_number(v) for k, v in comps.items())
    ):
        return f"field 'reward_components' must map names to finite numbers, got {comps!r}"
    return None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_offline(
    path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    shape: str = "auto",
    strict: bool = False,
    task: str = "offline",
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> OfflineDataset:
    """Read ``path`` (``.jsonl``/``.json`` lines or ``.parquet``) into buffer rows.

    ``cache_dir`` defaults to the dataset's folder; the cache file is
    ``<name>.<key>.tokens.parquet``.
    """
    src = Path(path)
    if shape not in ("auto", *SHAPES):
        raise OfflineDatasetError(f"bad shape {shape!r}; allowed: auto, {', '.join(SHAPES)}")
    if src.suffix not in SUFFIXES:
        raise OfflineDatasetError(
            f"{src}: unknown file type {src.suffix!r}; allowed: {', '.join(SUFFIXES)}"
        )
    if not src.is_file():
        raise OfflineDatasetError(f"{src}: offline dataset not found")
    digest = _digest(src)
    key_text = (
        f"{_CACHE_VERSION}|{digest}|{shape}|{strict}|{task}|{tokenizer_fingerprint(tokenizer)}"
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else src.parent
    cache_file = cache / f"{src.name}.{key}.tokens.parquet"
    storage = ParquetStorage()
    if use_cache and cache_file.is_file():
        try:
            table, meta = storage.read(cache_file)
            return OfflineDataset(
                validate(table, fill_defaults=False), meta["shape"], meta["records"],
                meta["skipped"], meta["errors"], cache_hit=True,
            )  # fmt: skip
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable token cache %s: %s", cache_file, exc)
    result = _tokenise(src, tokenizer, shape, strict, task, digest[:12])
    if use_cache:
        meta = {
            "shape": result.shape,
            "records": result.records,
            "skipped": result.skipped,
            "errors": result.errors,
        }
        write_atomic(storage, result.table, cache_file, meta)
    return result


def _tokenise(  # noqa: C901  (one skip reason per kind of bad record)
    src: Path, tokenizer: Any, shape: str, strict: bool, task: str, file_tag: str
) -> OfflineDataset:
    encode = make_encoder(tokenizer)
    memo: dict[str, list[int]] = {}

    def ids(text: str) -> list[int]:
        if text not in memo:
            memo[text] = encode(text)
        return memo[text]

    records, columns = _records(src)
    created = src.stat().st_mtime
    # added_at is stamped by the buffer; behaviour_logp and the reference's cached energies
    # are left empty (no policy drew the rows; the learner scores them).
    skip = ("added_at", "behaviour_logp", "mask_seed", "ref_energies")
    out: dict[str, list[Any]] = {name: [] for name in SAMPLE_SCHEMA.names if name not in skip}
    seen_ids: dict[str, str] = {}
    errors: list[str] = []
    skipped = count = 0

    def add_row(
        sample_id: str, prompt_id: str, group: str, rec: dict, text: str, reward: float, comps: Any
    ) -> None:
        out["sample_id"].append(sample_id)
        out["prompt_id"].append(prompt_id)
        out["prompt_ids"].append(ids(rec["prompt"]))
        out["completion_ids"].append(ids(text))
        out["reward"].append(float(reward))
        out["reward_components"].append(list(comps.items()) if comps else [])
        out["verifier_status"].append("offline")
        out["policy_version"].append(OFFLINE_VERSION)
        out["group_id"].append(group)
        out["task"].append(str(rec.get("task") or task))
        out["created_at"].append(created)

    for where, rec in records:
        count += 1
        if shape == "auto":
            detected = _detect(rec, columns)
            if detected is None and columns is not None:
                raise OfflineDatasetError(
                    f"{src}: cannot tell the shape from columns {columns}; allowed: {_ALLOWED}"
                )
            shape = detected or "auto"
        problem = (
            _check(rec, shape) if shape != "auto" else f"cannot tell the shape; allowed: {_ALLOWED}"
        )
        base = None
        if problem is None:
            base = (
                str(rec["sample_id"])
                if rec.get("sample_id") is not None
                else f"{file_tag}:{where.split()[1]}"
            )
            if base in seen_ids:
                problem = f"sample_id {base!r} repeats {seen_ids[base]}"
        if problem is not None:
            message = f"{src}: {where}: {problem}"
            if strict:
                raise OfflineDatasetError(message)
            skipped += 1
            if len(errors) < 20:
                errors.append(message)
            continue
        seen_ids[base] = where
        prompt_id = rec.get("prompt_id")
        prompt_id = (
            str(prompt_id)
            if prompt_id is not None
            else hashlib.sha1(rec["prompt"].encode()).hexdigest()[:16]
        )
        if shape == "scored":
            add_row(
                base,
                prompt_id,
                prompt_id,
                rec,
                rec["completion"],
                rec["reward"],
                rec.get("reward_components"),
            )
        else:
            add_row(f"{base}:chosen", prompt_id, base, rec, rec["chosen"], 1.0, None)
            add_row(f"{base}:rejected", prompt_id, base, rec, rec["rejected"], 0.0, None)
    if shape == "auto":
        shape = "scored"  # an empty file
    if skipped:
        log.warning(
            "%s: skipped %d malformed records of %d (first: %s)", src, skipped, count, errors[0]
        )
    arrays = {
        name: pa.array(values, SAMPLE_SCHEMA.field(name).type) for name, values in out.items()
    }
    table = validate(pa.table(arrays), now=created)
    return OfflineDataset(table, shape, count, skipped, errors)
