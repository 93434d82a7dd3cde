"""ExperienceBuffer: eviction, staleness, sampling, pairs, back-pressure, stats, snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from buffer_rows import ids_of, make_rows

from buffer.replay import ExperienceBuffer
from embr_rl.core.config import BufferConfig, load_config
from embr_rl.core.experience import OFFLINE_VERSION, SAMPLE_SCHEMA, SchemaError


def test_fifo_evicts_the_oldest_and_counts() -> None:
    buf = ExperienceBuffer(10)
    first = buf.add(make_rows(range(8)))
    assert (first.accepted, first.evicted, first.size) == (8, 0, 8)
    assert buf.sample(1).schema.equals(SAMPLE_SCHEMA)
    second = buf.add(make_rows(range(8, 13)))
    assert (second.accepted, second.evicted, second.size) == (5, 3, 10)
    assert ids_of(buf.pop(100)) == list(range(3, 13))
    assert buf.stats()["buffer/evicted"] == 3


def test_fifo_batch_larger_than_capacity_keeps_its_tail() -> None:
    buf = ExperienceBuffer(4)
    result = buf.add(make_rows(range(10)))
    assert (result.accepted, result.evicted) == (4, 6)
    assert ids_of(buf.pop(10)) == [6, 7, 8, 9]


def test_reservoir_keeps_a_uniform_sample_of_everything_offered() -> None:
    buf = ExperienceBuffer(1000, eviction="reservoir", seed=3)
    for start in range(0, 20000, 500):
        buf.add(make_rows(range(start, start + 500)))
    stats = buf.stats()
    assert len(buf) == 1000
    assert stats["buffer/evicted"] + stats["buffer/rejected"] == 19000
    kept = np.array(ids_of(buf.pop(1000)))
    assert len(set(kept.tolist())) == 1000
    # Uniform over all 20,000 offered: each quarter holds ~250 (binomial sd ~14).
    quarters = np.bincount(kept // 5000, minlength=4)
    assert all(180 < q < 320 for q in quarters), quarters
    # FIFO would have kept only the last 1000 rows.
    assert kept.min() < 15000


def test_staleness_drops_old_rows_and_counts_them_but_not_offline_rows() -> None:
    buf = ExperienceBuffer(100, max_staleness=2)
    buf.add(make_rows(range(0, 10), version=0))
    buf.add(make_rows(range(10, 20), version=OFFLINE_VERSION))
    buf.add(make_rows(range(20, 30), version=1))
    buf.set_policy_version(3)
    drawn = ids_of(buf.sample(100, generator=0))
    assert sorted(drawn) == list(range(10, 30))
    stats = buf.stats()
    assert stats["buffer/stale_dropped"] == 10
    assert stats["buffer/staleness/2"] == 10
    assert stats["buffer/offline_rows"] == 10
    assert "buffer/staleness/3" not in stats


def test_staleness_is_measured_against_the_newest_version_seen() -> None:
    buf = ExperienceBuffer(100, max_staleness=0)
    buf.add(make_rows(range(5), version=4))
    buf.add(make_rows(range(5, 8), version=5))
    assert buf.eligible_size() == 3
    assert buf.current_version() == 5


def test_uniform_sample_is_without_replacement_and_seeded() -> None:
    buf = ExperienceBuffer(100)
    buf.add(make_rows(range(50)))
    a = ids_of(buf.sample(20, generator=7))
    b = ids_of(buf.sample(20, generator=7))
    assert a == b and len(set(a)) == 20
    assert len(buf.sample(80)) == 50
    assert len(buf.sample(80, replace=True)) == 80
    assert len(ExperienceBuffer(5).sample(3)) == 0


def test_recency_sampling_prefers_new_rows() -> None:
    uniform = ExperienceBuffer(10000, seed=1)
    recent = ExperienceBuffer(10000, sampling="recency", recency_half_life=500, seed=1)
    for buf in (uniform, recent):
        buf.add(make_rows(range(5000)))
    u = np.array(ids_of(uniform.sample(500)))
    r = np.array(ids_of(recent.sample(500)))
    assert len(set(r.tolist())) == 500
    assert u.mean() < 3000
    # Weight 2^(-age/500): about 3/4 of the mass lies within the newest 1000 rows.
    assert np.mean(r >= 4000) > 0.6
    assert np.mean(u >= 4000) < 0.3
    rr = np.array(ids_of(recent.sample(2000, replace=True)))
    assert np.mean(rr >= 4000) > 0.6


def test_pairs_share_a_prompt_and_prefer_different_rewards() -> None:
    buf = ExperienceBuffer(1000)
    # p0..p3 have mixed rewards; p4 (ids = 4 mod 5) all reward 1.0.
    buf.add(make_rows(range(100), reward=lambda i: 1.0 if i % 5 == 4 else float(i % 2)))
    pairs = buf.sample_pairs(4, generator=0)
    first, second = pairs.first.to_pydict(), pairs.second.to_pydict()
    assert first["prompt_id"] == second["prompt_id"]
    assert sorted(first["prompt_id"]) == ["p0", "p1", "p2", "p3"]
    assert all(a != b for a, b in zip(first["reward"], second["reward"]))
    assert pairs.equal_reward_share == 0.0
    assert all(a != b for a, b in zip(first["sample_id"], second["sample_id"]))
    # Ten pairs: every mixed prompt is used before the equal-reward one, then the cycle repeats.
    more = buf.sample_pairs(10, generator=1)
    assert more.equal_reward_share == pytest.approx(0.2)
    assert buf.stats()["buffer/pairs_equal_reward_share"] == pytest.approx(2 / 14)


def test_pairs_with_only_equal_rewards_are_reported() -> None:
    buf = ExperienceBuffer(100)
    buf.add(make_rows(range(20), reward=lambda i: 0.5))
    pairs = buf.sample_pairs(6, generator=0)
    assert len(pairs) == 6
    assert pairs.equal_reward_share == 1.0
    assert pairs.first["prompt_id"].to_pylist() == pairs.second["prompt_id"].to_pylist()


def test_no_pairs_when_every_prompt_has_one_row() -> None:
    buf = ExperienceBuffer(100)
    buf.add(make_rows(range(5), prompts=5))
    assert len(buf.sample_pairs(3)) == 0


def test_pop_is_fifo_and_consumes() -> None:
    buf = ExperienceBuffer(100)
    buf.add(make_rows(range(10)))
    assert ids_of(buf.pop(4)) == [0, 1, 2, 3]
    assert ids_of(buf.pop(100)) == list(range(4, 10))
    assert len(buf) == 0 and len(buf.pop(3)) == 0


def test_backpressure_follows_the_learner() -> None:
    buf = ExperienceBuffer(50, max_lag=2)
    assert not buf.add(make_rows(range(40))).should_wait
    assert buf.add(make_rows(range(40, 50))).should_wait  # full before the learner started
    buf.sample(10)
    assert buf.lag() == 0.0 and not buf.should_wait()
    assert not buf.add(make_rows(range(50, 70))).should_wait  # lag 2.0
    result = buf.add(make_rows(range(70, 75)))
    assert result.should_wait and result.lag == pytest.approx(2.5)
    buf.sample(10)
    assert not buf.should_wait()


def test_stats_report_reward_by_task_and_counts() -> None:
    buf = ExperienceBuffer(100)
    buf.add(make_rows(range(10), reward=lambda i: float(i), task=lambda i: "a" if i < 4 else "b"))
    stats = buf.stats()
    assert stats["buffer/size"] == 10 and stats["buffer/rows_added"] == 10
    assert stats["buffer/add_calls"] == 1
    assert stats["buffer/reward_mean/a"] == pytest.approx(1.5)
    assert stats["buffer/reward_mean/b"] == pytest.approx(6.5)
    assert stats["buffer/rows/b"] == 6
    assert stats["buffer/staleness/0"] == 10


def test_bad_rows_are_rejected_without_changing_the_buffer() -> None:
    buf = ExperienceBuffer(10)
    buf.add(make_rows(range(3)))
    bad = make_rows(range(3, 6)).drop_columns(["task"])
    with pytest.raises(SchemaError, match="missing column 'task'"):
        buf.add(bad)
    assert len(buf) == 3 and buf.stats()["buffer/rows_added"] == 3


def test_bad_options_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="eviction: 'lifo'; allowed: fifo, reservoir"):
        ExperienceBuffer(10, eviction="lifo")
    with pytest.raises(ValueError, match="unknown buffer storage 'csv'; allowed: parquet"):
        ExperienceBuffer(10, snapshot_dir="x", storage="csv")


def test_snapshot_restore_round_trip(tmp_path: Path) -> None:
    buf = ExperienceBuffer(100, snapshot_dir=tmp_path, snapshot_keep=2)
    buf.add(make_rows(range(30), version=2))
    buf.sample(5)
    first = buf.snapshot()
    buf.add(make_rows(range(30, 40), version=3))
    buf.snapshot()
    buf.add(make_rows(range(40, 45), version=3))
    last = buf.close()
    snaps = sorted(p.name for p in tmp_path.iterdir())
    assert snaps == ["snapshot-000001.parquet", "snapshot-000002.parquet"]
    assert not Path(first).exists()
    again = ExperienceBuffer(100, snapshot_dir=tmp_path, resume=True)
    assert len(again) == 45
    assert ids_of(again.pop(100)) == list(range(45))
    stats = again.stats()
    assert stats["buffer/rows_added"] == 45 and stats["buffer/rows_sampled"] == 5
    assert stats["buffer/policy_version"] == 3
    assert Path(last).name == "snapshot-000002.parquet"
    # Parquet renames nested fields; the restored buffer must still take new rows.
    again.add(make_rows(range(45, 50)))
    assert again.sample(100).schema.equals(SAMPLE_SCHEMA)
    assert sorted(ids_of(again.sample(100))) == list(range(45, 50))


def test_restore_keeps_the_newest_rows_when_capacity_shrank(tmp_path: Path) -> None:
    buf = ExperienceBuffer(100, snapshot_dir=tmp_path)
    buf.add(make_rows(range(20)))
    path = buf.snapshot()
    small = ExperienceBuffer(5)
    assert small.restore(path) == 5
    assert ids_of(small.pop(10)) == list(range(15, 20))


def test_snapshots_follow_the_schedule_and_skip_temporary_files(tmp_path: Path) -> None:
    now = [1000.0]
    buf = ExperienceBuffer(100, snapshot_dir=tmp_path, snapshot_every_s=60, clock=lambda: now[0])
    buf.add(make_rows(range(5)))
    assert not list(tmp_path.glob("snapshot-*"))
    now[0] += 61
    buf.add(make_rows(range(5, 8)))
    assert [p.name for p in tmp_path.glob("snapshot-*")] == ["snapshot-000000.parquet"]
    (tmp_path / ".snapshot-000001.parquet.tmp-99").write_bytes(b"PAR1 half a file")
    again = ExperienceBuffer(100, snapshot_dir=tmp_path, resume=True)
    assert len(again) == 8
    assert not list(tmp_path.glob(".snapshot-*"))


def test_restore_falls_back_past_an_unreadable_snapshot(tmp_path: Path) -> None:
    buf = ExperienceBuffer(100, snapshot_dir=tmp_path, snapshot_keep=3)
    buf.add(make_rows(range(4)))
    buf.snapshot()
    (tmp_path / "snapshot-000001.parquet").write_bytes(b"not parquet")
    assert ExperienceBuffer(100, snapshot_dir=tmp_path, resume=True).size() == 4


def test_from_config_and_new_config_fields_validate() -> None:
    cfg = BufferConfig(capacity=7, eviction="reservoir", max_staleness=1, snapshot_keep=3)
    buf = ExperienceBuffer.from_config(cfg, seed=1)
    assert (buf.capacity, buf.eviction, buf.max_staleness) == (7, "reservoir", 1)
    loaded = load_config(overrides=["buffer.snapshot_keep=4", "buffer.storage=parquet"])
    assert loaded.buffer.snapshot_keep == 4
    with pytest.raises(ValueError, match=r"buffer.storage.*allowed: 'parquet'"):
        load_config(overrides=["buffer.storage=csv"])
    with pytest.raises(ValueError, match=r"buffer.snapshot_keep"):
        load_config(overrides=["buffer.snapshot_keep=0"])


def test_sample_returns_the_drawn_rows_in_draw_order_across_many_adds() -> None:
    buf = ExperienceBuffer(5000)
    start = 0
    for n in [7, 300, 1, 64, 64, 900, 13, 256, 256, 256, 5]:
        buf.add(make_rows(range(start, start + n)))
        start += n
    # Tiered chunks: O(log n) of them however many adds there were.
    assert buf._table.column(0).num_chunks <= 12
    expected = np.random.default_rng(5).choice(start, 500, replace=False)
    assert ids_of(buf.sample(500, generator=5)) == expected.tolist()
    drawn = buf.sample(50, generator=6)
    assert drawn.column("completion_ids").to_pylist() == [[4, 5, i % 100] for i in ids_of(drawn)]


def test_an_empty_buffer_round_trips_through_save_to(tmp_path: Path) -> None:
    # A checkpoint taken before the first batch arrived holds an empty buffer.
    buf = ExperienceBuffer(8)
    path = buf.save_to(tmp_path / "buffer.parquet")
    again = ExperienceBuffer(8)
    assert again.restore(path) == 0 and len(again) == 0
