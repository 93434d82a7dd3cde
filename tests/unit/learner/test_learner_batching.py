"""Buffer rows -> LossBatch, rank shards and micro-batches."""

from __future__ import annotations

import pytest
import torch

from embr_rl.core.config import LearnerConfig
from embr_rl.core.experience import PairBatch, rows_from_dicts
from embr_rl.core.losses import LossModels
from learner.batching import TokenIds, pairs_to_batch, rows_to_batch, shard, split_batch
from learner.learner import lr_factor

MODELS = LossModels(policy=torch.nn.Identity(), mask_id=31)
IDS = TokenIds(pad_id=0, eos_id=1)


def _rows(prompts: list[list[int]], comps: list[list[int]], groups: list[str], tag: str = ""):
    return rows_from_dicts(
        [
            {
                "sample_id": f"{tag}{i}",
                "prompt_id": g,
                "group_id": g,
                "prompt_ids": p,
                "completion_ids": c,
                "reward": float(i),
                "policy_version": 0,
                "task": "t",
            }
            for i, (p, c, g) in enumerate(zip(prompts, comps, groups, strict=True))
        ]
    )


def test_rows_left_pad_prompts_and_span() -> None:
    t = _rows([[5, 6, 7], [8]], [[2, 1, 1], [3, 4]], ["a", "b"])
    b = rows_to_batch(t, MODELS, ids=IDS, span="until_eos")
    assert b.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b.prompt_attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.completion_ids.tolist() == [[2, 1, 1], [3, 4, 0]]
    # until_eos keeps the first EOS; padding is never in the span.
    assert b.completion_mask.tolist() == [[True, True, False], [True, True, False]]
    assert b.rewards.tolist() == [0.0, 1.0] and b.group_ids.tolist() == [0, 1]
    w = rows_to_batch(t, MODELS, ids=IDS, span="window")
    assert w.completion_mask.tolist() == [[True, True, True], [True, True, False]]


def test_until_eos_span_ends_at_any_stop_id() -> None:
    # 4 stands for an end-of-turn id (<|eot_id|>) after which the EOS (1) fills the window.
    t = _rows([[5], [5], [5]], [[2, 4, 1, 1], [3, 1, 4, 1], [2, 3, 5, 6]], ["a", "a", "b"])
    ids = TokenIds(pad_id=0, eos_id=1, stop_ids=(4,))
    b = rows_to_batch(t, MODELS, ids=ids, span="until_eos")
    assert b.completion_mask.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True] * 4,
    ]
    eos_only = rows_to_batch(t, MODELS, ids=IDS, span="until_eos")
    assert eos_only.completion_mask[0].tolist() == [True, True, True, False]


def test_pairs_interleaved_and_split_whole() -> None:
    first = _rows([[5]] * 4, [[2, 3]] * 4, ["a", "b", "c", "d"])
    second = _rows([[5]] * 4, [[4, 3]] * 4, ["a", "b", "c", "d"], "s")
    b = pairs_to_batch(PairBatch(first, second, 0.0), MODELS, ids=IDS)
    assert b.pairs.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert b.completion_ids[:, 0].tolist() == [2, 4] * 4
    # pairs share a prompt and are grouped by prompt_id
    assert b.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    micros = split_batch(b, 2)
    assert [m.pairs.tolist() for m in micros] == [[[0, 1], [2, 3]]] * 2
    assert torch.equal(micros[1].group_ids, b.group_ids[4:])
    with pytest.raises(ValueError, match="4 pairs cannot fill 8"):
        split_batch(b, 8)


def test_shard_rows_and_pairs() -> None:
    t = _rows([[5]] * 4, [[2]] * 4, ["a", "a", "b", "b"])
    assert shard(t, 1, 2).column("sample_id").to_pylist() == ["2", "3"]
    pb = shard(PairBatch(t, t, 0.5), 0, 4)
    assert len(pb) == 1 and pb.equal_reward_share == 0.5
    with pytest.raises(ValueError, match="4 cannot be split evenly over 3"):
        shard(t, 0, 3)


def test_lr_warmup_then_decay() -> None:
    cfg = LearnerConfig(warmup_steps=4, total_steps=14, lr_schedule="cosine")
    f = [lr_factor(s, cfg) for s in range(15)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[9] == pytest.approx(0.5) and f[14] == pytest.approx(0.0)
    lin = LearnerConfig(warmup_steps=0, total_steps=10, lr_schedule="linear")
    assert lr_factor(5, lin) == pytest.approx(0.5)
    assert lr_factor(3, LearnerConfig(lr_schedule="constant")) == 1.0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("learner.placement_strategy=CLUSTER", "learner.placement_strategy"),
        ("learner.sync_backend=mpi", "learner.sync_backend"),
        ("learner.adam_eps=0", "learner.adam_eps"),
    ],
)
def test_learner_config_fields_are_validated(override: str, key: str) -> None:
    from embr_rl.core.config import ConfigError, load_config

    assert load_config(overrides=[]).learner.placement_strategy == "PACK"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])
