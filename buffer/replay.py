"""``ExperienceBuffer``: the replay buffer between rollout workers and the learner.

A plain class (``embr_rl.run`` wraps it with ``ray.remote``). Rows are kept as one Arrow
table in insertion order, with small NumPy side arrays (insertion sequence, policy version)
for the sampling arithmetic, so ``add`` appends chunks without copying the row data and
``sample`` is one ``Table.take``.

What the learner gets: ``sample`` and ``pop`` return a ``pyarrow.Table`` of
:data:`embr_rl.core.experience.SAMPLE_SCHEMA`; ``sample_pairs`` returns :class:`PairBatch`, two such
tables aligned row by row. Scalars convert with ``table["reward"].to_numpy()``, token ids
with :func:`embr_rl.core.experience.token_matrix` (both then ``torch.from_numpy``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from buffer.storage import SnapshotStore, make_storage, write_atomic
from embr_rl.core.experience import SAMPLE_SCHEMA, PairBatch, empty_table, validate

if TYPE_CHECKING:
    from embr_rl.core.config import BufferConfig

GeneratorLike = np.random.Generator | int | None


@dataclass(frozen=True)
class AddResult:
    """What one ``add`` did, and whether the producer should wait (back-pressure)."""

    accepted: int  # rows of this call now held
    evicted: int  # rows this call pushed out, or (reservoir, oversized batch) never let in
    size: int  # rows held after the call
    lag: float  # learner steps' worth of rows added since the learner's last draw
    should_wait: bool  # True: pause, then poll ``should_wait()``


class ExperienceBuffer:
    """A capacity-bounded sample buffer with FIFO or reservoir eviction.

    ``max_staleness`` (policy versions): rows whose ``policy_version`` is more than that
    behind the current version (the larger of :meth:`set_policy_version` and the newest
    row seen) are dropped before sampling and counted in ``buffer/stale_dropped``.
    Offline rows (``policy_version < 0``) never go stale.

    Back-pressure: ``lag`` is the number of rows added since the learner last drew
    (``sample``, ``sample_pairs`` or ``pop``) divided by the rows of that draw, i.e. learner
    steps' worth of unread data. ``should_wait`` is ``lag > max_lag``, or, before the
    first draw, a full buffer. Producers pause and poll :meth:`should_wait`.
    """

    def __init__(
        self,
        capacity: int = 50000,
        *,
        eviction: str = "fifo",
        sampling: str = "uniform",
        recency_half_life: float = 1000.0,
        max_staleness: int | None = None,
        max_lag: float = 4,
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_every_s: float = 300.0,
        snapshot_keep: int = 2,
        storage: str = "parquet",
        seed: int = 0,
        resume: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value, allowed in (
            ("eviction", eviction, ("fifo", "reservoir")),
            ("sampling", sampling, ("uniform", "recency")),
        ):
            if value not in allowed:
                raise ValueError(f"bad value for {name}: {value!r}; allowed: {', '.join(allowed)}")
        if capacity < 1:
            raise ValueError(f"bad value for capacity: {capacity}; allowed: an integer >= 1")
        if recency_half_life <= 0:
            raise ValueError(f"bad value for recency_half_life: {recency_half_life}; allowed: > 0")
        self.capacity = capacity
        self.eviction = eviction
        self.sampling = sampling
        self.recency_half_life = recency_half_life
        self.max_staleness = max_staleness
        self.max_lag = max_lag
        self.snapshot_every_s = snapshot_every_s
        self._clock = clock
        self._rng = np.random.default_rng(seed)
        self._store = (
            SnapshotStore(snapshot_dir, make_storage(storage), keep=snapshot_keep)
            if snapshot_dir is not None
            else None
        )
        self._table = empty_table()
        self._seq = np.zeros(0, np.int64)
        self._version = np.zeros(0, np.int64)
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "rows_added", "add_calls", "evicted", "rejected", "stale_dropped",
                "rows_sampled", "sample_calls", "popped", "pairs", "equal_pairs",
                "snapshots", "seen", "next_seq", "since_draw", "last_draw",
            ),
            0,
        )  # fmt: skip
        self._policy_version = 0
        self._max_seen_version = 0
        self._last_snapshot = clock()
        self._pair_cache: tuple[int, Any] | None = None
        self._mutations = 0
        if resume and self._store is not None:
            self.restore()

    @staticmethod
    def config_kwargs(
        cfg: BufferConfig,
        *,
        seed: int = 0,
        snapshot_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        max_staleness: int | str | None = "config",
    ) -> dict[str, Any]:
        """Constructor keyword arguments from ``cfg.buffer``; ``snapshot_dir`` and
        ``max_staleness`` (unless ``"config"``) override the config's values."""
        return dict(
            capacity=cfg.capacity,
            eviction=cfg.eviction,
            sampling=cfg.sampling,
            recency_half_life=cfg.recency_half_life,
            max_staleness=cfg.max_staleness if max_staleness == "config" else max_staleness,
            max_lag=cfg.max_lag,
            snapshot_dir=snapshot_dir if snapshot_dir is not None else cfg.snapshot_dir,
            snapshot_every_s=cfg.snapshot_every_s,
            snapshot_keep=cfg.snapshot_keep,
            storage=cfg.storage,
            seed=seed,
            resume=resume,
        )

    @classmethod
    def from_config(
        cls,
        cfg: BufferConfig,
        *,
        seed: int = 0,
        snapshot_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> ExperienceBuffer:
        """Build from ``cfg.buffer``; ``snapshot_dir`` overrides ``cfg.snapshot_dir``."""
        return cls(**cls.config_kwargs(cfg, seed=seed, snapshot_dir=snapshot_dir, resume=resume))

    # ------------------------------------------------------------------ adding

    def add(self, rows: pa.Table | pa.RecordBatch) -> AddResult:
        """Append rows (validated against the schema; ``added_at`` is set here)."""
        now = self._clock()
        table = validate(rows, now=now)
        n = table.num_rows
        added_at = pa.array(np.full(n, now, dtype=np.float64))
        table = table.set_column(
            SAMPLE_SCHEMA.get_field_index("added_at"), SAMPLE_SCHEMA.field("added_at"), added_at
        )
        c = self._counters
        seq = np.arange(c["next_seq"], c["next_seq"] + n, dtype=np.int64)
        c["next_seq"] += n
        version = table.column("policy_version").to_numpy()
        if n:
            self._max_seen_version = max(self._max_seen_version, int(version.max()))
        before = c["evicted"] + c["rejected"]
        if self.eviction == "fifo":
            self._append(table, seq, version)
            overflow = len(self) - self.capacity
            if overflow > 0:
                self._drop_front(overflow)
                c["evicted"] += overflow
            c["seen"] += n
        else:
            self._add_reservoir(table, seq, version)
        lost = c["evicted"] + c["rejected"] - before
        c["rows_added"] += n
        c["add_calls"] += 1
        c["since_draw"] += n
        self._mutations += 1
        if self._store is not None and now - self._last_snapshot >= self.snapshot_every_s:
            self.snapshot()
        return AddResult(
            accepted=self._accepted(n, seq),
            evicted=lost,
            size=len(self),
            lag=self.lag(),
            should_wait=self.should_wait(),
        )

    def _accepted(self, n: int, seq: np.ndarray) -> int:
        if not n or not len(self._seq):
            return 0
        return int(np.count_nonzero(self._seq >= seq[0]))

    def _append(self, table: pa.Table, seq: np.ndarray, version: np.ndarray) -> None:
        # Chunks are kept in tiers (each at least twice the next, like a binary counter), so
        # a buffer of n rows has O(log n) chunks and each row is copied O(log n) times.
        # ``take`` over many chunks concatenates them first, which is what this avoids.
        new = table.to_batches() if table.num_rows else []
        if len(new) > 1:
            new = pa.Table.from_batches(new).combine_chunks().to_batches()
        parts = [b for b in self._table.to_batches() if b.num_rows] + new
        while len(parts) >= 2 and parts[-2].num_rows <= 2 * parts[-1].num_rows:
            parts[-2:] = pa.Table.from_batches(parts[-2:]).combine_chunks().to_batches()
        self._table = pa.Table.from_batches(parts, schema=SAMPLE_SCHEMA)
        self._seq = np.concatenate([self._seq, seq])
        self._version = np.concatenate([self._version, version])

    def _take(self, idx: np.ndarray) -> pa.Table:
        """Rows at positions ``idx`` (in that order), taking from each chunk separately."""
        parts = [b for b in self._table.to_batches() if b.num_rows]
        if len(parts) <= 1:
            return self._table.take(pa.array(idx, pa.int64()))
        bounds = np.cumsum([b.num_rows for b in parts])
        order = np.argsort(idx, kind="stable")
        where = np.searchsorted(bounds, idx[order], side="right")
        starts = np.r_[0, bounds[:-1]]
        pieces = []
        for c in np.unique(where):
            local = idx[order][where == c] - starts[c]
            pieces.append(parts[c].take(pa.array(local)))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.Table.from_batches(pieces, schema=SAMPLE_SCHEMA).take(pa.array(inverse))

    def _keep(self, mask: np.ndarray) -> None:
        self._table = self._table.filter(pa.array(mask))
        self._seq = self._seq[mask]
        self._version = self._version[mask]

    def _drop_front(self, k: int) -> None:
        self._table = self._table.slice(k)
        self._seq = self._seq[k:]
        self._version = self._version[k:]

    def _add_reservoir(self, table: pa.Table, seq: np.ndarray, version: np.ndarray) -> None:
        # Algorithm R over the batch: the t-th row ever offered takes a uniformly random
        # slot with probability capacity / (t + 1) once the buffer is full.
        c = self._counters
        old_n = len(self)
        keep_old = np.ones(old_n, dtype=bool)
        slot_of: dict[int, int] = {}
        filled = old_n
        for i in range(table.num_rows):
            t = c["seen"]
            c["seen"] += 1
            if filled < self.capacity:
                slot = filled
                filled += 1
            else:
                slot = int(self._rng.integers(0, t + 1))
                if slot >= self.capacity:
                    c["rejected"] += 1
                    continue
            if slot in slot_of:
                c["rejected"] += 1
            elif slot < old_n:
                keep_old[slot] = False
                c["evicted"] += 1
            slot_of[slot] = i
        if not keep_old.all():
            self._keep(keep_old)
        new_rows = np.sort(np.fromiter(slot_of.values(), dtype=np.int64, count=len(slot_of)))
        if len(new_rows):
            self._append(table.take(new_rows), seq[new_rows], version[new_rows])

    # ------------------------------------------------------------------ versions, staleness

    def set_policy_version(self, version: int) -> None:
        """Tell the buffer the learner's current policy version (for staleness)."""
        self._policy_version = max(self._policy_version, int(version))

    def current_version(self) -> int:
        """The version staleness is measured against."""
        return max(self._policy_version, self._max_seen_version)

    def _drop_stale(self) -> None:
        if self.max_staleness is None or not len(self):
            return
        stale = (self._version >= 0) & (self.current_version() - self._version > self.max_staleness)
        k = int(np.count_nonzero(stale))
        if k:
            self._keep(~stale)
            self._counters["stale_dropped"] += k
            self._mutations += 1

    # ------------------------------------------------------------------ drawing

    def __len__(self) -> int:
        return len(self._seq)

    def size(self) -> int:
        """Rows held now (stale rows included until the next draw)."""
        return len(self)

    def eligible_size(self) -> int:
        """Rows a draw could return now (stale rows are dropped first)."""
        self._drop_stale()
        return len(self)

    def _generator(self, generator: GeneratorLike) -> np.random.Generator:
        if generator is None:
            return self._rng
        if isinstance(generator, np.random.Generator):
            return generator
        return np.random.default_rng(generator)

    def _record_draw(self, rows: int) -> None:
        c = self._counters
        c["since_draw"] = 0
        c["last_draw"] = max(rows, 1)

    def sample(self, n: int, *, generator: GeneratorLike = None, replace: bool = False) -> pa.Table:
        """Draw ``n`` rows (fewer if fewer are eligible and ``replace`` is false).

        ``sampling="uniform"`` weighs rows equally; ``"recency"`` weighs a row by
        ``2 ** (-age / recency_half_life)``, age counted in rows added since it.
        ``generator`` is a NumPy generator, an int seed, or None for the buffer's own.
        """
        if n < 0:
            raise ValueError(f"bad value for n: {n}; allowed: an integer >= 0")
        self._drop_stale()
        rng = self._generator(generator)
        size = len(self)
        k = n if replace else min(n, size)
        if k == 0 or size == 0:
            return empty_table()
        if self.sampling == "uniform":
            idx = rng.integers(0, size, k) if replace else rng.choice(size, k, replace=False)
        else:
            logw = (self._seq - self._seq[-1]) * (math.log(2.0) / self.recency_half_life)
            if replace:
                p = np.exp(logw - logw.max())
                idx = rng.choice(size, k, p=p / p.sum())
            else:  # Gumbel top-k: weighted sampling without replacement in one pass
                keys = logw + rng.gumbel(size=size)
                idx = np.argpartition(-keys, k - 1)[:k] if k < size else rng.permutation(size)
        self._counters["rows_sampled"] += k
        self._counters["sample_calls"] += 1
        self._record_draw(k)
        return self._take(idx)

    def _groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows sorted by prompt, group starts/ends, and whether each group's rewards differ."""
        if self._pair_cache is not None and self._pair_cache[0] == self._mutations:
            return self._pair_cache[1]
        codes = pc.dictionary_encode(self._table.column("prompt_id").combine_chunks()).indices
        codes = codes.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        ends = np.r_[starts[1:], len(order)]
        reward = self._table.column("reward").to_numpy()[order]
        mixed = np.minimum.reduceat(reward, starts) != np.maximum.reduceat(reward, starts)
        result = (order, starts, ends, mixed)
        self._pair_cache = (self._mutations, result)
        return result

    def sample_pairs(self, n: int, *, generator: GeneratorLike = None) -> PairBatch:
        """Draw ``n`` pairs of distinct rows with the same ``prompt_id``.

        Prompts whose rows have different rewards come first (each once, in random order),
        then prompts with equal rewards; when more pairs are needed than there are such
        prompts the cycle repeats. Within a mixed prompt the second row has a reward
        different from the first. ``equal_reward_share`` reports the pairs that could not.
        """
        self._drop_stale()
        rng = self._generator(generator)
        if n <= 0 or len(self) < 2:
            return PairBatch(empty_table(), empty_table(), 0.0)
        order, starts, ends, mixed = self._groups()
        pairable = (ends - starts) >= 2
        mixed_groups = np.flatnonzero(pairable & mixed)
        equal_groups = np.flatnonzero(pairable & ~mixed)
        if not len(mixed_groups) and not len(equal_groups):
            return PairBatch(empty_table(), empty_table(), 0.0)
        chosen: list[int] = []
        while len(chosen) < n:
            chosen.extend(rng.permutation(mixed_groups).tolist())
            chosen.extend(rng.permutation(equal_groups).tolist())
        reward = self._table.column("reward").to_numpy()
        first = np.empty(n, np.int64)
        second = np.empty(n, np.int64)
        for j, g in enumerate(chosen[:n]):
            rows = order[starts[g] : ends[g]]
            a = rows[rng.integers(len(rows))]
            others = rows[reward[rows] != reward[a]] if mixed[g] else rows[rows != a]
            first[j], second[j] = a, others[rng.integers(len(others))]
        equal = int(np.count_nonzero(reward[first] == reward[second]))
        c = self._counters
        c["pairs"] += n
        c["equal_pairs"] += equal
        c["rows_sampled"] += 2 * n
        c["sample_calls"] += 1
        self._record_draw(2 * n)
        return PairBatch(self._take(first), self._take(second), equal / n)

    def pop(self, n: int) -> pa.Table:
        """Remove and return the oldest ``n`` rows (a consuming, each-row-once read)."""
        self._drop_stale()
        k = max(0, min(n, len(self)))
        out = self._table.slice(0, k)
        self._drop_front(k)
        self._counters["popped"] += k
        self._mutations += 1
        if k:
            self._record_draw(k)
        return out

    # ------------------------------------------------------------------ back-pressure

    def lag(self) -> float:
        """Learner steps' worth of rows added since the learner's last draw (0 before any)."""
        c = self._counters
        return c["since_draw"] / c["last_draw"] if c["last_draw"] else 0.0

    def should_wait(self) -> bool:
        """True while producers should pause: the learner lags by more than ``max_lag``."""
        if not self._counters["last_draw"]:
            return len(self) >= self.capacity
        return self.lag() > self.max_lag

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, float]:
        """Scalar metrics named ``buffer/...``.

        Per version lag ``d``: ``buffer/staleness/<d>`` rows; per task: ``buffer/rows/<task>``
        and ``buffer/reward_mean/<task>``.
        """
        c = self._counters
        out: dict[str, float] = {
            "buffer/size": len(self),
            "buffer/capacity": self.capacity,
            "buffer/rows_added": c["rows_added"],
            "buffer/add_calls": c["add_calls"],
            "buffer/evicted": c["evicted"],
            "buffer/rejected": c["rejected"],
            "buffer/stale_dropped": c["stale_dropped"],
            "buffer/rows_sampled": c["rows_sampled"],
            "buffer/popped": c["popped"],
            "buffer/pairs": c["pairs"],
            "buffer/pairs_equal_reward_share": c["equal_pairs"] / c["pairs"] if c["pairs"] else 0.0,
            "buffer/lag": self.lag(),
            "buffer/should_wait": float(self.should_wait()),
            "buffer/policy_version": self.current_version(),
            "buffer/snapshots": c["snapshots"],
            "buffer/offline_rows": int(np.count_nonzero(self._version < 0)),
        }
        online = self._version[self._version >= 0]
        deltas, counts = np.unique(self.current_version() - online, return_counts=True)
        for d, k in zip(deltas.tolist(), counts.tolist()):
            out[f"buffer/staleness/{d}"] = k
        if len(self):
            by_task = self._table.group_by("task").aggregate(
                [("reward", "mean"), ("reward", "count")]
            )
            for task, mean, rows in zip(
                by_task["task"].to_pylist(),
                by_task["reward_mean"].to_pylist(),
                by_task["reward_count"].to_pylist(),
            ):
                out[f"buffer/reward_mean/{task}"] = mean
                out[f"buffer/rows/{task}"] = rows
        return out

    # ------------------------------------------------------------------ persistence

    def _state(self) -> dict[str, Any]:
        return {
            "counters": self._counters,
            "policy_version": self._policy_version,
            "max_seen_version": self._max_seen_version,
            "capacity": self.capacity,
            "eviction": self.eviction,
        }

    def snapshot(self) -> str:
        """Write the contents atomically to the next numbered snapshot; return its path."""
        if self._store is None:
            raise RuntimeError("this buffer has no snapshot_dir; pass snapshot_dir= to snapshot")
        self._counters["snapshots"] += 1
        path = self._store.save(self._table, self._state())
        self._last_snapshot = self._clock()
        return str(path)

    def save_to(self, path: str | os.PathLike[str]) -> str:
        """Write the contents and counters atomically to ``path`` (a run checkpoint's copy);
        :meth:`restore` with that path reads it back."""
        storage = self._store.storage if self._store is not None else make_storage("parquet")
        return str(write_atomic(storage, self._table, path, self._state()))

    def restore(self, path: str | os.PathLike[str] | None = None) -> int:
        """Load the newest snapshot (or ``path``); return the rows restored (0 if none)."""
        if path is not None:
            store = self._store.storage if self._store is not None else make_storage("parquet")
            table, meta = store.read(path)
        else:
            if self._store is None:
                raise RuntimeError("this buffer has no snapshot_dir to restore from")
            self._store.clean_temporary()
            found = self._store.load_latest()
            if found is None:
                return 0
            table, meta, _ = found
        table = validate(table.replace_schema_metadata(None), fill_defaults=False)
        if table.num_rows > self.capacity:
            table = table.slice(table.num_rows - self.capacity)
        counters = meta.get("counters", {})
        self._counters.update({k: int(v) for k, v in counters.items() if k in self._counters})
        self._counters["next_seq"] = max(self._counters["next_seq"], table.num_rows)
        self._policy_version = int(meta.get("policy_version", 0))
        self._max_seen_version = int(meta.get("max_seen_version", 0))
        n = table.num_rows
        self._table = table
        self._seq = np.arange(
            self._counters["next_seq"] - n, self._counters["next_seq"], dtype=np.int64
        )
        self._version = table.column("policy_version").to_numpy().astype(np.int64)
        self._mutations += 1
        return n

    def close(self) -> str | None:
        """Snapshot on shutdown when a snapshot directory is set; return the path written."""
        return self.snapshot() if self._store is not None else None
