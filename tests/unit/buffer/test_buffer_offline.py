"""Offline datasets: both shapes, both file types, malformed input, the token cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from buffer.offline import OfflineDatasetError, load_offline, make_encoder
from buffer.replay import ExperienceBuffer
from embr_rl.core.experience import OFFLINE_VERSION, SAMPLE_SCHEMA


class CharTokenizer:
    """One id per character (its code point), counting the texts it encodes."""

    def __init__(self, offset: int = 0) -> None:
        self.calls = 0
        self.offset = offset

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [ord(c) + self.offset for c in text]


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


SCORED = [
    {"prompt": "1+1", "completion": "2", "reward": 1.0},
    {"prompt": "1+1", "completion": "3", "reward": 0},
    {"prompt": "2+2", "completion": "4", "reward": 1, "task": "arith", "prompt_id": 17},
]
PAIRS = [
    {"prompt": "2+3", "chosen": "5", "rejected": "6"},
    {"prompt": "4+4", "chosen": "8", "rejected": "9", "sample_id": "pair-b"},
]


def test_scored_jsonl(tmp_path: Path) -> None:
    tok = CharTokenizer()
    data = load_offline(_jsonl(tmp_path / "s.jsonl", SCORED), tok, use_cache=False)
    t = data.table
    assert data.shape == "scored" and data.records == 3 and data.skipped == 0
    assert t.schema.equals(SAMPLE_SCHEMA)
    assert t.column("prompt_ids").to_pylist()[0] == [ord("1"), ord("+"), ord("1")]
    assert t.column("completion_ids").to_pylist() == [[ord("2")], [ord("3")], [ord("4")]]
    assert t.column("reward").to_pylist() == [1.0, 0.0, 1.0]
    assert t.column("policy_version").to_pylist() == [OFFLINE_VERSION] * 3
    assert t.column("task").to_pylist() == ["offline", "offline", "arith"]
    pids = t.column("prompt_id").to_pylist()
    assert pids[0] == pids[1] and pids[2] == "17"
    assert len(set(t.column("sample_id").to_pylist())) == 3
    # "1+1" is encoded once: 2 prompts + 3 completions.
    assert tok.calls == 5 + 1  # plus the tokenizer-fingerprint probe


def test_pairs_jsonl_become_two_rows_with_rewards_one_and_zero(tmp_path: Path) -> None:
    data = load_offline(_jsonl(tmp_path / "p.jsonl", PAIRS), CharTokenizer(), use_cache=False)
    t = data.table.to_pydict()
    assert data.shape == "pairs" and data.table.num_rows == 4
    assert t["reward"] == [1.0, 0.0, 1.0, 0.0]
    assert t["completion_ids"] == [[ord("5")], [ord("6")], [ord("8")], [ord("9")]]
    assert t["sample_id"][2:] == ["pair-b:chosen", "pair-b:rejected"]
    assert t["group_id"][0] == t["group_id"][1] != t["group_id"][2]
    assert t["prompt_id"][0] == t["prompt_id"][1]
    buf = ExperienceBuffer(10)
    buf.add(data.table)
    pairs = buf.sample_pairs(2, generator=0)
    assert pairs.equal_reward_share == 0.0


@pytest.mark.parametrize("records, shape", [(SCORED, "scored"), (PAIRS, "pairs")])
def test_parquet_both_shapes(tmp_path: Path, records: list[dict], shape: str) -> None:
    keys = sorted({k for r in records for k in r})
    table = pa.table({k: [r.get(k) for r in records] for k in keys})
    pq.write_table(table, tmp_path / "d.parquet")
    data = load_offline(tmp_path / "d.parquet", CharTokenizer(), use_cache=False)
    assert data.shape == shape
    assert data.table.num_rows == len(records) * (2 if shape == "pairs" else 1)


def test_malformed_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [
            SCORED[0],
            '{"prompt": "x", "completion": ',  # line 2: invalid JSON
            {"prompt": "x", "completion": "y"},  # line 3: no reward
            {"prompt": "x", "completion": "y", "reward": "high"},  # line 4
            {"prompt": "x", "completion": 5, "reward": 1},  # line 5
            [1, 2],  # line 6
            {"prompt": "x", "completion": "y", "reward": float("nan")},  # line 7 (NaN)
            SCORED[1],
        ],
    )
    data = load_offline(path, CharTokenizer(), use_cache=False)
    assert data.table.num_rows == 2 and data.skipped == 6 and data.records == 8
    assert [e.split(": ", 2)[1] for e in data.errors] == [f"line {i}" for i in range(2, 8)]
    assert "invalid JSON" in data.errors[0]
    assert (
        "missing field 'reward'; the scored shape needs prompt, completion, reward"
        in data.errors[1]
    )
    assert "field 'reward' must be a finite number, got 'high'" in data.errors[2]
    assert "field 'completion' must be a string, got int" in data.errors[3]


def test_strict_fails_on_the_first_malformed_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "a", "chosen": "b"}])
    with pytest.raises(OfflineDatasetError, match=r"bad.jsonl: line 2: missing field 'rejected'"):
        load_offline(path, CharTokenizer(), strict=True, use_cache=False)


def test_malformed_parquet_row_is_named_by_row(tmp_path: Path) -> None:
    table = pa.table(
        {"prompt": ["a", "b", None], "completion": ["x", "y", "z"], "reward": [1.0, None, 0.0]}
    )
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(OfflineDatasetError, match=r"d.parquet: row 1: missing field 'reward'"):
        load_offline(tmp_path / "d.parquet", CharTokenizer(), strict=True, use_cache=False)
    data = load_offline(tmp_path / "d.parquet", CharTokenizer(), use_cache=False)
    assert data.skipped == 2 and data.table.num_rows == 1


def test_parquet_of_unknown_shape_names_its_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), tmp_path / "d.parquet")
    with pytest.raises(
        OfflineDatasetError, match=r"columns \['question', 'answer'\]; allowed: scored"
    ):
        load_offline(tmp_path / "d.parquet", CharTokenizer(), use_cache=False)


def test_repeated_sample_id_is_malformed(tmp_path: Path) -> None:
    recs = [{**SCORED[0], "sample_id": "a"}, {**SCORED[1], "sample_id": "a"}]
    data = load_offline(_jsonl(tmp_path / "d.jsonl", recs), CharTokenizer(), use_cache=False)
    assert data.skipped == 1 and "sample_id 'a' repeats line 1" in data.errors[0]


def test_explicit_shape_mismatch_and_bad_file_type(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", SCORED)
    with pytest.raises(OfflineDatasetError, match="line 1: missing field 'chosen'"):
        load_offline(path, CharTokenizer(), shape="pairs", strict=True, use_cache=False)
    with pytest.raises(OfflineDatasetError, match=r"unknown file type '.csv'; allowed: .jsonl"):
        load_offline(tmp_path / "d.csv", CharTokenizer())


def test_tokenisation_is_cached_on_disk(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", SCORED)
    cache = tmp_path / "cache"
    first = load_offline(path, CharTokenizer(), cache_dir=cache)
    assert not first.cache_hit and len(list(cache.glob("s.jsonl.*.tokens.parquet"))) == 1
    tok = CharTokenizer()
    second = load_offline(path, tok, cache_dir=cache)
    assert second.cache_hit and tok.calls == 1  # only the fingerprint probe
    assert second.table.equals(first.table)
    # A different tokenizer (other ids) must not reuse the cache.
    third = load_offline(path, CharTokenizer(offset=1), cache_dir=cache)
    assert not third.cache_hit
    assert third.table.column("completion_ids").to_pylist()[0] == [ord("2") + 1]
    # Nor may an edited file.
    _jsonl(path, SCORED[:2])
    assert load_offline(path, CharTokenizer(), cache_dir=cache).table.num_rows == 2


def test_encoder_accepts_hf_style_callables_and_encode_with_kwargs() -> None:
    def call(text: str) -> dict[str, list[int]]:
        return {"input_ids": [len(text)]}

    class HFLike:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return ([0] if add_special_tokens else []) + [len(text)]

    assert make_encoder(call)("abc") == [3]
    assert make_encoder(HFLike())("abc") == [3]
    with pytest.raises(TypeError, match=r"tokenizer must have \.encode"):
        make_encoder(42)


def test_a_hugging_face_tokenizer_is_used_without_special_tokens(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "[BOS]": 1, "2+3": 2, "5": 3, "6": 4}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    core.post_processor = tokenizers.processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", bos_token="[BOS]"
    )
    assert hf.encode("5") == [1, 3]  # the post-processor would add BOS
    data = load_offline(_jsonl(tmp_path / "p.jsonl", PAIRS[:1]), hf, cache_dir=tmp_path)
    assert data.table.column("prompt_ids").to_pylist() == [[2], [2]]
    assert data.table.column("completion_ids").to_pylist() == [[3], [4]]
    assert load_offline(tmp_path / "p.jsonl", hf, cache_dir=tmp_path).cache_hit


def test_undecodable_huge_and_oversized_lines_are_named_and_skipped(tmp_path: Path) -> None:
    from buffer.offline import MAX_LINE_BYTES

    path = tmp_path / "bad.jsonl"
    good = [json.dumps(r).encode() for r in SCORED]
    lines = [
        good[0],
        json.dumps({"prompt": "x", "completion": "y", "reward": 0}).encode()[:-2] + b'\xff"}',
        json.dumps({"prompt": "1", "completion": "2", "reward": 10**400}).encode(),
        json.dumps(
            {"prompt": "p" * (MAX_LINE_BYTES + 10), "completion": "c", "reward": 1}
        ).encode(),
        good[1],
        b"[" * 100000,
        good[2],
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = load_offline(path, CharTokenizer(), use_cache=False)
    assert data.records == 7 and data.skipped == 4 and data.table.num_rows == 3
    text = "\n".join(data.errors)
    assert "line 2: invalid JSON (not UTF-8: byte 0xff" in text
    assert "line 3: field 'reward' must be a finite number" in text
    assert f"line 4: invalid JSON (a line of {len(lines[3]) + 1:,} bytes" in text
    assert "line 6: invalid JSON" in text
    with pytest.raises(OfflineDatasetError, match="line 2: invalid JSON"):
        load_offline(path, CharTokenizer(), strict=True, use_cache=False)


def test_a_json_array_file_is_read_as_records(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([*SCORED, "not a record"], indent=1))
    data = load_offline(path, CharTokenizer(), use_cache=False)
    assert data.shape == "scored" and data.table.num_rows == 3 and data.skipped == 1
    assert "item 3: expected an object" in data.errors[0]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(SCORED)[:-5])
    with pytest.raises(OfflineDatasetError, match="not a JSON array of records"):
        load_offline(broken, CharTokenizer(), use_cache=False)
