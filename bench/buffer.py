"""Buffer throughput: add and sample rows/s through a Ray actor vs a plain Python list, and
Parquet snapshot MB/s, all measured side by side in one process.

    .venv/bin/python bench/buffer.py [--batches 100 --batch 256 --completion-len 256]

Prints one line per measurement and the ratios (actor / list baseline).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffer.replay import ExperienceBuffer


def _lists(matrix: np.ndarray) -> pa.ListArray:
    """A ``list<int32>`` array with one row per matrix row, built from offsets (no copies)."""
    rows, width = matrix.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel()))


def make_batches(args: argparse.Namespace) -> list[pa.Table]:
    """Random rows of realistic shape: prompt and completion token ids, reward, components."""
    rng = np.random.default_rng(0)
    batches = []
    for b in range(args.batches):
        n = args.batch
        ids = [f"b{b}-{i}" for i in range(n)]
        prompt = rng.integers(0, 32000, (n, args.prompt_len), dtype=np.int32)
        completion = rng.integers(0, 32000, (n, args.completion_len), dtype=np.int32)
        batches.append(
            pa.table(
                {
                    "sample_id": ids,
                    "prompt_id": [f"p{b}-{i // 8}" for i in range(n)],
                    "prompt_ids": _lists(prompt),
                    "completion_ids": _lists(completion),
                    "reward": rng.integers(0, 2, n).astype(np.float64),
                    "reward_components": pa.array(
                        [[("correct", 1.0), ("format", 0.5)]] * n,
                        pa.map_(pa.string(), pa.float64()),
                    ),
                    "verifier_status": ["ok"] * n,
                    "policy_version": np.full(n, b // 10, dtype=np.int64),
                    "group_id": [f"g{b}-{i // 8}" for i in range(n)],
                    "task": ["gsm8k"] * n,
                    "created_at": np.full(n, time.time()),
                }
            )
        )
    return batches


class ListBuffer:
    """The baseline: a plain Python list of row dicts (FIFO by a bounded deque)."""

    def __init__(self, capacity: int) -> None:
        self.rows: deque[dict] = deque(maxlen=capacity)
        self.rng = random.Random(0)

    def add(self, rows: list[dict]) -> int:
        self.rows.extend(rows)
        return len(self.rows)

    def sample(self, n: int) -> list[dict]:
        return self.rng.sample(self.rows, n)

    def size(self) -> int:
        return len(self.rows)


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Seconds for ``repeat`` calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256, help="rows per add call")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=256)
    parser.add_argument("--sample", type=int, default=256, help="rows per sample call")
    parser.add_argument("--sample-calls", type=int, default=200)
    args = parser.parse_args()

    batches = make_batches(args)
    dict_batches = [t.to_pylist() for t in batches]
    total = sum(t.num_rows for t in batches)
    capacity = total
    print(
        f"rows {total} in {args.batches} batches of {args.batch}; prompt {args.prompt_len} + "
        f"completion {args.completion_len} tokens; sample {args.sample} x {args.sample_calls}"
    )

    # Baseline: a plain Python list of row dicts, in this process.
    baseline = ListBuffer(capacity)
    it = iter(dict_batches)
    list_add_s = timed(lambda: baseline.add(next(it)), len(dict_batches))
    list_sample_s = timed(lambda: baseline.sample(args.sample), args.sample_calls)

    # The buffer in-process (no Ray), for reference.
    local = ExperienceBuffer(capacity, seed=0)
    it2 = iter(batches)
    local_add_s = timed(lambda: local.add(next(it2)), len(batches))
    local_sample_s = timed(lambda: local.sample(args.sample), args.sample_calls)

    # Through a Ray actor, one producer waiting for each call (as a rollout worker does).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(ExperienceBuffer).options(num_cpus=0).remote(capacity, seed=0)
        ray.get(actor.size.remote())  # started
        it3 = iter(batches)
        ray_add_s = timed(lambda: ray.get(actor.add.remote(next(it3))), len(batches))
        ray_sample_s = timed(lambda: ray.get(actor.sample.remote(args.sample)), args.sample_calls)
        # Same transport, plain list inside the actor: what Arrow buys over Python dicts.
        list_actor = ray.remote(ListBuffer).options(num_cpus=0).remote(capacity)
        ray.get(list_actor.size.remote())
        it4 = iter(dict_batches)
        ray_list_add_s = timed(lambda: ray.get(list_actor.add.remote(next(it4))), len(batches))
        ray_list_sample_s = timed(
            lambda: ray.get(list_actor.sample.remote(args.sample)), args.sample_calls
        )
    finally:
        ray.shutdown()

    # Parquet snapshot of the full buffer.
    with tempfile.TemporaryDirectory() as tmp:
        local_snap = ExperienceBuffer(capacity, snapshot_dir=tmp)
        for t in batches:
            local_snap.add(t)
        arrow_mb = local_snap._table.nbytes / 1e6
        snap_s = timed(local_snap.snapshot, 1)
        file_mb = sum(p.stat().st_size for p in Path(tmp).glob("snapshot-*")) / 1e6
        restore_s = timed(lambda: ExperienceBuffer(capacity, snapshot_dir=tmp, resume=True), 1)

    n_sampled = args.sample * args.sample_calls
    table = [
        ("add, plain list in-process", total / list_add_s),
        ("add, plain list in a Ray actor", total / ray_list_add_s),
        ("add, ExperienceBuffer in-process", total / local_add_s),
        ("add, ExperienceBuffer Ray actor", total / ray_add_s),
        ("sample, plain list in-process", n_sampled / list_sample_s),
        ("sample, plain list in a Ray actor", n_sampled / ray_list_sample_s),
        ("sample, ExperienceBuffer in-process", n_sampled / local_sample_s),
        ("sample, ExperienceBuffer Ray actor", n_sampled / ray_sample_s),
    ]
    rate = dict(table)
    for name, value in table:
        print(f"{name:40s} {value:14,.0f} rows/s")
    for op in ("add", "sample"):
        actor = rate[f"{op}, ExperienceBuffer Ray actor"]
        print(
            f"ratio {op:6s} ExperienceBuffer actor / list in-process: "
            f"{actor / rate[f'{op}, plain list in-process']:.3f}x; "
            f"/ list actor: {actor / rate[f'{op}, plain list in a Ray actor']:.2f}x"
        )
    print(
        f"snapshot: {arrow_mb:.1f} MB Arrow -> {file_mb:.1f} MB Parquet (zstd) in {snap_s:.2f} s = "
        f"{arrow_mb / snap_s:.0f} MB/s of Arrow data ({file_mb / snap_s:.0f} MB/s written); "
        f"restore {arrow_mb / restore_s:.0f} MB/s"
    )


if __name__ == "__main__":
    main()
