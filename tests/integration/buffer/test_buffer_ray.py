"""Through Ray: producers and a consumer exchange rows via buffer actors; none lost or repeated."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from buffer.replay import ExperienceBuffer
from buffer.sharded import RayShardClient, ShardedBuffer

TOTAL = 10_000
PER_PRODUCER = TOTAL // 2
BATCH = 250


def _actors(ray: Any) -> tuple[Any, Any]:
    # Defined inside a function so Ray ships the classes by value (the test module itself
    # is not importable on the workers).

    @ray.remote(num_cpus=0)
    class Producer:
        def run(
            self, buf: Any, worker: int, count: int, batch: int, router: bool = False
        ) -> dict[str, int]:
            import time

            import pyarrow as pa

            waits = 0
            # A plain router object is called directly; an actor handle through Ray.
            call = (
                (lambda m, *a: getattr(buf, m)(*a))
                if router
                else (lambda m, *a: ray.get(getattr(buf, m).remote(*a)))
            )
            for start in range(0, count, batch):
                ids = range(start, min(start + batch, count))
                rows = pa.table(
                    {
                        "sample_id": [f"w{worker}-{i}" for i in ids],
                        "prompt_id": [f"w{worker}-p{i % 97}" for i in ids],
                        "prompt_ids": pa.array([[1, 2]] * len(ids), pa.list_(pa.int32())),
                        "completion_ids": pa.array(
                            [[i % 50, 3] for i in ids], pa.list_(pa.int32())
                        ),
                        "reward": [float(i % 2) for i in ids],
                        "policy_version": [0] * len(ids),
                        "task": ["arith"] * len(ids),
                    }
                )
                wait = call("add", rows).should_wait
                while wait:
                    waits += 1
                    time.sleep(0.005)
                    wait = call("should_wait")
            return {"sent": count, "waits": waits}

    @ray.remote(num_cpus=0)
    class Consumer:
        def run(self, buf: Any, want: int, chunk: int, timeout_s: float) -> list[str]:
            import time

            got: list[str] = []
            deadline = time.monotonic() + timeout_s
            while len(got) < want and time.monotonic() < deadline:
                table = ray.get(buf.pop.remote(chunk))
                if table.num_rows == 0:
                    time.sleep(0.005)
                got.extend(table.column("sample_id").to_pylist())
            return got

    return Producer, Consumer


def _rows(prefix: str, n: int) -> pa.Table:
    return pa.table(
        {
            "sample_id": [f"{prefix}-{i}" for i in range(n)],
            "prompt_id": [f"q{i % 40}" for i in range(n)],
            "prompt_ids": pa.array([[1]] * n, pa.list_(pa.int32())),
            "completion_ids": pa.array([[i % 9] for i in range(n)], pa.list_(pa.int32())),
            "reward": [float(i % 3) for i in range(n)],
            "policy_version": [1] * n,
            "task": ["arith"] * n,
        }
    )


def _expected() -> set[str]:
    return {f"w{w}-{i}" for w in range(2) for i in range(PER_PRODUCER)}


@pytest.mark.integration
def test_two_producers_one_consumer_exchange_10000_rows(ray_session: Any) -> None:
    ray = ray_session
    Producer, Consumer = _actors(ray)
    # Back-pressure on: producers wait while more than 2 draws' worth is unread. The driver
    # draws once first (100 rows), so every later add of 250 rows asks its producer to wait.
    buf = ray.remote(ExperienceBuffer).options(num_cpus=0).remote(TOTAL * 2, max_lag=2)
    ray.get(buf.add.remote(_rows("warm", 100)))
    assert ray.get(buf.pop.remote(100)).num_rows == 100
    producers = [Producer.remote() for _ in range(2)]
    consumer = Consumer.remote()
    got_ref = consumer.run.remote(buf, TOTAL, 100, 120.0)
    runs = ray.get([p.run.remote(buf, w, PER_PRODUCER, BATCH) for w, p in enumerate(producers)])
    got = ray.get(got_ref)
    assert all(r["waits"] >= PER_PRODUCER // BATCH for r in runs), runs
    assert len(got) == TOTAL, f"lost {TOTAL - len(got)} rows"
    assert len(set(got)) == TOTAL, "rows delivered twice"
    assert set(got) == _expected()
    stats = ray.get(buf.stats.remote())
    assert stats["buffer/rows_added"] == TOTAL + 100 and stats["buffer/popped"] == TOTAL + 100
    assert stats["buffer/evicted"] == 0 and stats["buffer/size"] == 0
    assert sum(r["sent"] for r in runs) == TOTAL
    for actor in (*producers, consumer, buf):
        ray.kill(actor)


@pytest.mark.integration
def test_sharded_router_over_ray_actors(ray_session: Any) -> None:
    ray = ray_session
    Producer, _ = _actors(ray)
    Shard = ray.remote(ExperienceBuffer).options(num_cpus=0)
    shards = [Shard.remote(TOTAL, seed=i) for i in range(2)]
    router = ShardedBuffer(shards, RayShardClient(timeout_s=60), seed=0)
    producer = Producer.remote()
    # The router is a plain object: it travels to the producer and routes there.
    ray.get(producer.run.remote(router, 0, 1000, BATCH, True))

    rows = _rows("d", 2000)
    result = router.add(rows)
    assert result.accepted == 2000 and result.size == 3000
    sizes = ray.get([s.size.remote() for s in shards])
    assert sizes[1] > 0, "routing put every prompt on one shard"
    drawn = router.sample(500, generator=1)
    assert drawn.num_rows == 500 and len(set(drawn.column("sample_id").to_pylist())) == 500
    pairs = router.sample_pairs(64, generator=2)
    assert len(pairs) == 64 and pairs.equal_reward_share == 0.0
    got: list[str] = []
    while router.size():
        got.extend(router.pop(400).column("sample_id").to_pylist())
    assert len(got) == 3000 and len(set(got)) == 3000
    assert router.stats()["buffer/popped"] == 3000
    for actor in (*shards, producer):
        ray.kill(actor)
