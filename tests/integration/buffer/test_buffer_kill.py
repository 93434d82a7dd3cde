"""Crash safety: SIGKILL a process that adds rows and snapshots, at random moments, repeatedly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[3]

# Row i is fully determined by i, so a snapshot can be checked row by row.
CHILD = r"""
import sys
import numpy as np
import pyarrow as pa
from buffer.replay import ExperienceBuffer

def rows(start, n):
    i = np.arange(start, start + n)
    return pa.table({
        "sample_id": [f"s{k}" for k in i.tolist()],
        "prompt_id": [f"p{k % 50}" for k in i.tolist()],
        "prompt_ids": pa.array([[1, 2, 3]] * n, pa.list_(pa.int32())),
        "completion_ids": pa.array([[k % 1000, 7, 8, 9] for k in i.tolist()], pa.list_(pa.int32())),
        "reward": (i % 7).astype(np.float64),
        "policy_version": i // 1000,
        "task": ["arith"] * n,
    })

buf = ExperienceBuffer(10**7, snapshot_dir=sys.argv[1], snapshot_keep=3, resume=True,
                       snapshot_every_s=1e9)
next_id = len(buf)
print("ready", next_id, flush=True)
while True:
    buf.add(rows(next_id, 400))
    next_id += 400
    buf.snapshot()
"""


def _check_snapshot(path: Path) -> int:
    table = pq.read_table(path)
    n = table.num_rows
    ids = table.column("sample_id").to_pylist()
    assert ids == [f"s{k}" for k in range(n)], f"{path.name}: not a prefix of the rows added"
    assert table.column("reward").to_pylist() == [float(k % 7) for k in range(n)], path.name
    assert [c[0] for c in table.column("completion_ids").to_pylist()] == [
        k % 1000 for k in range(n)
    ]
    return n


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_at_random_points_leaves_only_complete_prefix_snapshots(tmp_path: Path) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    restored = []
    largest = 0
    for trial in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = child.stdout.readline()
        assert line.startswith("ready"), f"child failed: {line!r} {child.stderr.read()}"
        restored.append(int(line.split()[1]))
        time.sleep(rng.uniform(0.1, 0.9))
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, f"child failed on its own: {err[-3000:]}"
        snaps = sorted(tmp_path.glob("snapshot-*.parquet"))
        assert snaps or trial == 0, f"seed {seed}: no snapshot after trial {trial}"
        sizes = [_check_snapshot(p) for p in snaps]
        assert sizes == sorted(sizes), f"seed {seed}: snapshots not in order {sizes}"
        largest = max([largest, *sizes])
    # Each restart resumed from the newest snapshot on disk, so progress carried over.
    assert restored == sorted(restored) and restored[-1] > 0, (seed, restored)
    assert largest >= restored[-1]
