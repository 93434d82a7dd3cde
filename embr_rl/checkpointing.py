"""Run checkpoints on disk: one folder per step, complete once ``state.json`` is in it.

Layout under ``<run_dir>/checkpoints/step_00000050/``: ``learner/`` (DeepSpeed state,
RNG per rank, Hugging Face export), ``buffer.parquet`` (the buffer's rows and counters)
and ``state.json`` (step, policy version, prompt position, the driver's RNG), written last
and atomically, so a folder without it is an interrupted save and is ignored (and removed
by the next :meth:`CheckpointManager.prune`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
PREFIX = "step_"


class CheckpointManager:
    """Where checkpoints go, which one to resume from, and how many to keep."""

    def __init__(self, run_dir: str | os.PathLike[str], keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"bad value for keep_last: {keep_last}; allowed: >= 1")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:08d}"

    @staticmethod
    def is_complete(path: str | os.PathLike[str]) -> bool:
        return (Path(path) / STATE_FILE).is_file()

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and self.is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to start from for ``checkpoint.resume`` (``auto``, ``never`` or a path)."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not self.is_complete(path):
            raise FileNotFoundError(
                f"checkpoint.resume={resume!r}: no complete checkpoint there (no {STATE_FILE}); "
                "allowed: 'auto', 'never' or a checkpoint folder such as "
                f"{self.path_for(50)}"
            )
        return path

    @staticmethod
    def write_state(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
        """Write ``state.json`` atomically: the checkpoint is complete from this moment."""
        target = Path(path) / STATE_FILE
        tmp = target.with_name(f".{STATE_FILE}.tmp")
        with open(tmp, "w") as fh:
            json.dump(state, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return target

    @staticmethod
    def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
        return json.loads((Path(path) / STATE_FILE).read_text())

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints and any incomplete
        one older than the newest complete; returns what was removed."""
        done = self.complete()
        removed = done[: max(0, len(done) - self.keep_last)]
        if done and self.root.is_dir():
            newest = done[-1].name
            removed += [
                p
                for p in self.root.glob(f"{PREFIX}*")
                if p.is_dir() and not self.is_complete(p) and p.name < newest
            ]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed
