"""Several buffer shards behind one router, for when a single buffer actor is the bottleneck.

Rows are routed by a stable hash of ``prompt_id`` (CRC-32, the same in every process), so
all completions of a prompt live on one shard and ``sample_pairs`` works per shard. Draws
are split across shards in proportion to their eligible rows (hypergeometric without
replacement, multinomial with), then gathered.

The router never touches Ray itself: it calls shards through a :class:`ShardClient`,
``submit(shard, method, *args)`` then ``gather(pending)``. :class:`LocalShardClient`
calls plain objects; :class:`RayShardClient` calls actor handles (``embr_rl.run`` makes
the actors with ``ray.remote(ExperienceBuffer)``), so all shards work concurrently.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from buffer.replay import AddResult, GeneratorLike
from embr_rl.core.experience import PairBatch, empty_table, validate


class ShardClient(Protocol):
    """How the router calls a shard: start a call, then collect the results of several."""

    def submit(self, shard: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``shard.method(*args, **kwargs)``; return something :meth:`gather` resolves."""

    def gather(self, pending: list[Any]) -> list[Any]:
        """The results of submitted calls, in order."""


class LocalShardClient:
    """Shards are plain objects in this process."""

    def submit(self, shard: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(shard, method)(*args, **kwargs)

    def gather(self, pending: list[Any]) -> list[Any]:
        return list(pending)


class RayShardClient:
    """Shards are Ray actor handles; calls run concurrently and are collected with ``ray.get``."""

    def __init__(self, timeout_s: float | None = None) -> None:
        import ray

        self._ray = ray
        self.timeout_s = timeout_s

    def submit(self, shard: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(shard, method).remote(*args, **kwargs)

    def gather(self, pending: list[Any]) -> list[Any]:
        return self._ray.get(pending, timeout=self.timeout_s)


def route(prompt_ids: pa.ChunkedArray | pa.Array, num_shards: int) -> np.ndarray:
    """The shard index of each row: ``crc32(prompt_id) % num_shards``."""
    encoded = pc.dictionary_encode(prompt_ids)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    per_prompt = np.array(
        [zlib.crc32(p.encode()) % num_shards for p in encoded.dictionary.to_pylist()], np.int64
    )
    return per_prompt[encoded.indices.to_numpy(zero_copy_only=False)]


class ShardedBuffer:
    """The :class:`buffer.replay.ExperienceBuffer` API over several shards."""

    def __init__(self, shards: Sequence[Any], client: ShardClient | None = None, *, seed: int = 0):
        if not shards:
            raise ValueError("ShardedBuffer needs at least one shard")
        self.shards = list(shards)
        self.client = client if client is not None else LocalShardClient()
        self._rng = np.random.default_rng(seed)
        self._sizes = [0] * len(self.shards)  # as last reported to this router

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        c = self.client
        return c.gather([c.submit(s, method, *args, **kwargs) for s in self.shards])

    def _seeds(self, generator: GeneratorLike) -> list[int]:
        if isinstance(generator, np.random.Generator):
            rng = generator
        elif generator is None:
            rng = self._rng
        else:
            rng = np.random.default_rng(generator)
        return rng.integers(0, 2**63 - 1, len(self.shards)).tolist()

    def add(self, rows: pa.Table | pa.RecordBatch) -> AddResult:
        """Validate, route by prompt id, add to every shard concerned in parallel.

        ``size`` in the result sums each shard's size as this router last saw it (no extra
        round trip); ``should_wait`` is true when any shard written to asks for it.
        """
        table = validate(rows)
        where = route(table.column("prompt_id"), len(self.shards))
        pending, involved = [], []
        for i, shard in enumerate(self.shards):
            idx = np.flatnonzero(where == i)
            if len(idx):
                pending.append(self.client.submit(shard, "add", table.take(pa.array(idx))))
                involved.append(i)
        results: list[AddResult] = self.client.gather(pending)
        for i, r in zip(involved, results):
            self._sizes[i] = r.size
        return AddResult(
            accepted=sum(r.accepted for r in results),
            evicted=sum(r.evicted for r in results),
            size=sum(self._sizes),
            lag=max((r.lag for r in results), default=0.0),
            should_wait=any(r.should_wait for r in results),
        )

    def _split(
        self, n: int, replace: bool, generator: GeneratorLike
    ) -> tuple[list[int], list[int]]:
        sizes = np.array(self._all("eligible_size"), dtype=np.int64)
        self._sizes = sizes.tolist()
        seeds = self._seeds(generator)
        rng = np.random.default_rng(seeds[0] ^ 0x5EED)
        total = int(sizes.sum())
        if total == 0 or n <= 0:
            return [0] * len(sizes), seeds
        if replace:
            counts = rng.multinomial(n, sizes / total)
        else:
            counts = rng.multivariate_hypergeometric(sizes, min(n, total))
        return counts.tolist(), seeds

    def sample(self, n: int, *, generator: GeneratorLike = None, replace: bool = False) -> pa.Table:
        """Draw ``n`` rows across shards in proportion to their eligible rows."""
        counts, seeds = self._split(n, replace, generator)
        c = self.client
        pending = [
            c.submit(s, "sample", k, generator=seed, replace=replace)
            for s, k, seed in zip(self.shards, counts, seeds)
            if k
        ]
        parts = c.gather(pending)
        return pa.concat_tables(parts) if parts else empty_table()

    def sample_pairs(self, n: int, *, generator: GeneratorLike = None) -> PairBatch:
        """Draw ``n`` same-prompt pairs, split across shards by eligible rows."""
        counts, seeds = self._split(n, True, generator)
        c = self.client
        pending = [
            c.submit(s, "sample_pairs", k, generator=seed)
            for s, k, seed in zip(self.shards, counts, seeds)
            if k
        ]
        parts: list[PairBatch] = [p for p in c.gather(pending) if len(p)]
        if not parts:
            return PairBatch(empty_table(), empty_table(), 0.0)
        total = sum(len(p) for p in parts)
        equal = sum(p.equal_reward_share * len(p) for p in parts)
        return PairBatch(
            pa.concat_tables([p.first for p in parts]),
            pa.concat_tables([p.second for p in parts]),
            equal / total,
        )

    def pop(self, n: int) -> pa.Table:
        """Remove and return up to ``n`` rows, the oldest of each shard, split by shard size."""
        counts, _ = self._split(n, False, None)
        c = self.client
        parts = c.gather([c.submit(s, "pop", k) for s, k in zip(self.shards, counts) if k])
        return pa.concat_tables(parts) if parts else empty_table()

    def set_policy_version(self, version: int) -> None:
        """Forward the learner's policy version to every shard."""
        self._all("set_policy_version", version)

    def size(self) -> int:
        """Rows held across shards."""
        return sum(self._all("size"))

    def __len__(self) -> int:
        return self.size()

    def eligible_size(self) -> int:
        """Rows a draw could return now, across shards."""
        return sum(self._all("eligible_size"))

    def should_wait(self) -> bool:
        """True while any shard asks producers to wait."""
        return any(self._all("should_wait"))

    def stats(self) -> dict[str, float]:
        """Shard stats merged: counts summed, lag the worst, reward means weighted by rows."""
        merged: dict[str, float] = {}
        means: dict[str, tuple[float, float]] = {}
        per_shard = self._all("stats")
        for s in per_shard:
            for key, value in s.items():
                if key.startswith("buffer/reward_mean/"):
                    task = key.removeprefix("buffer/reward_mean/")
                    rows = s.get(f"buffer/rows/{task}", 0)
                    acc = means.get(task, (0.0, 0.0))
                    means[task] = (acc[0] + value * rows, acc[1] + rows)
                elif key in ("buffer/lag", "buffer/should_wait", "buffer/policy_version"):
                    merged[key] = max(merged.get(key, value), value)
                elif key != "buffer/pairs_equal_reward_share":
                    merged[key] = merged.get(key, 0) + value
        pairs = merged.get("buffer/pairs", 0)
        equal = sum(s["buffer/pairs_equal_reward_share"] * s["buffer/pairs"] for s in per_shard)
        merged["buffer/pairs_equal_reward_share"] = equal / pairs if pairs else 0.0
        for task, (total, rows) in means.items():
            merged[f"buffer/reward_mean/{task}"] = total / rows if rows else 0.0
        merged["buffer/num_shards"] = len(self.shards)
        return merged

    def snapshot(self) -> list[str]:
        """Snapshot every shard (each to its own directory)."""
        return self._all("snapshot")

    def close(self) -> list[str | None]:
        """Close every shard (snapshotting those with a snapshot directory)."""
        return self._all("close")
