"""ShardedBuffer over local shards: routing, proportional draws, pairs, merged stats."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from buffer_rows import ids_of, make_rows

from buffer.replay import ExperienceBuffer
from buffer.sharded import LocalShardClient, ShardedBuffer, route


def _sharded(k: int = 3, capacity: int = 10000, **kw: object) -> ShardedBuffer:
    return ShardedBuffer([ExperienceBuffer(capacity, seed=i, **kw) for i in range(k)], seed=0)


def test_route_is_stable_and_spreads_prompts() -> None:
    prompts = pa.array([f"p{i}" for i in range(1000)])
    where = route(prompts, 4)
    np.testing.assert_array_equal(where, route(prompts, 4))
    assert route(pa.array(["p7", "p7", "p7"]), 4).tolist() == [where[7]] * 3
    counts = np.bincount(where, minlength=4)
    assert counts.min() > 180, counts


def test_rows_of_a_prompt_live_on_one_shard_and_nothing_is_lost() -> None:
    buf = _sharded()
    result = buf.add(make_rows(range(300), prompts=30))
    assert result.accepted == 300 and result.size == 300 and len(buf) == 300
    for shard in buf.shards:
        prompts = set(shard.pop(1000).column("prompt_id").to_pylist())
        for other in buf.shards:
            if other is not shard:
                assert not prompts & set(other._table.column("prompt_id").to_pylist())


def test_sample_is_proportional_to_shard_sizes_and_without_replacement() -> None:
    buf = _sharded(2)
    buf.add(make_rows(range(2000), prompts=400))
    sizes = [s.size() for s in buf.shards]
    drawn = buf.sample(1000, generator=5)
    assert drawn.num_rows == 1000 and len(set(ids_of(drawn))) == 1000
    shard_of = route(drawn.column("prompt_id"), 2)
    share = np.bincount(shard_of, minlength=2) / 1000
    np.testing.assert_allclose(share, np.array(sizes) / 2000, atol=0.05)
    assert buf.sample(5000).num_rows == 2000
    assert buf.sample(3000, replace=True).num_rows == 3000


def test_pairs_and_pop_across_shards() -> None:
    buf = _sharded(3)
    buf.add(make_rows(range(600), prompts=61))  # odd: every prompt mixes rewards
    pairs = buf.sample_pairs(50, generator=1)
    assert len(pairs) == 50
    assert pairs.first["prompt_id"].to_pylist() == pairs.second["prompt_id"].to_pylist()
    assert pairs.equal_reward_share == 0.0
    got: list[int] = []
    while len(buf):
        got.extend(ids_of(buf.pop(64)))
    assert sorted(got) == list(range(600))


def test_stats_merge_and_versions_reach_every_shard() -> None:
    buf = _sharded(2, max_staleness=0)
    buf.add(make_rows(range(100), reward=lambda i: float(i % 4), task=lambda i: "a"))
    buf.set_policy_version(1)
    assert buf.eligible_size() == 0
    stats = buf.stats()
    assert stats["buffer/stale_dropped"] == 100 and stats["buffer/num_shards"] == 2
    buf.add(make_rows(range(100, 200), version=1, reward=lambda i: float(i % 4)))
    stats = buf.stats()
    assert stats["buffer/size"] == 100 and stats["buffer/rows_added"] == 200
    assert stats["buffer/reward_mean/arith"] == 1.5
    assert Counter(k.split("/")[1] for k in stats)["staleness"] == 1


def test_backpressure_from_any_shard() -> None:
    buf = ShardedBuffer([ExperienceBuffer(10), ExperienceBuffer(1000)], LocalShardClient())
    hot = next(p for p in (f"p{i}" for i in range(100)) if route(pa.array([p]), 2)[0] == 0)
    rows = make_rows(range(10), prompts=1).set_column(1, "prompt_id", pa.array([hot] * 10))
    assert buf.add(rows).should_wait and buf.should_wait()


def test_snapshot_and_close_per_shard(tmp_path: Path) -> None:
    shards = [ExperienceBuffer(100, snapshot_dir=tmp_path / f"shard{i}") for i in range(2)]
    buf = ShardedBuffer(shards)
    buf.add(make_rows(range(40), prompts=8))
    paths = buf.close()
    restored = [
        ExperienceBuffer(100, snapshot_dir=tmp_path / f"shard{i}", resume=True) for i in range(2)
    ]
    assert len(paths) == 2 and sum(len(s) for s in restored) == 40
