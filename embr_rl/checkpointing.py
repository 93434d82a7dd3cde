"""Run checkpoints on disk: one folder per step, complete once ``state.json`` is in it.

Layout under ``<run_dir>/checkpoints/step_00000050/``: ``learner/`` (DeepSpeed state,
RNG per rank, Hugging Face export), ``buffer.parquet`` (the buffer's rows and counters)
and ``state.json`` (step, policy version, prompt position, the driver's RNG, and a
manifest: the size of every other file of the folder), written last and atomically. A
folder whose ``state.json`` is missing or unreadable, or whose files do not match its
manifest, is an interrupted or damaged save: resuming skips it (``skipped`` says why) and
the next :meth:`CheckpointManager.prune` removes it once a newer complete one exists.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
PREFIX = "step_"
MANIFEST = "manifest"


def _manifest(path: Path) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file under ``path`` but ``state.json``."""
    out = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and rel != STATE_FILE and not f.name.startswith(f".{STATE_FILE}"):
            out[rel] = f.stat().st_size
    return out


def damage(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it is complete."""
    p = Path(path)
    try:
        state = json.loads((p / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{STATE_FILE} unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    manifest = state.get(MANIFEST)
    if not isinstance(manifest, dict):
        return None  # written before manifests existed
    for rel, size in manifest.items():
        f = p / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} written"
    return None


class CheckpointManager:
    """Where checkpoints go, which one to resume from, and how many to keep."""

    def __init__(self, run_dir: str | os.PathLike[str], keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"bad value for keep_last: {keep_last}; allowed: >= 1")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        # (folder, reason) of every damaged checkpoint the last complete() passed over.
        self.skipped: list[tuple[Path, str]] = []

    def path_for(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:08d}"

    @staticmethod
    def is_complete(path: str | os.PathLike[str]) -> bool:
        return damage(path) is None

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first; damaged ones go to :attr:`skipped`."""
        self.skipped = []
        if not self.root.is_dir():
            return []
        found = []
        for p in sorted(self.root.glob(f"{PREFIX}*"), key=lambda p: p.name):
            if not p.is_dir():
                continue
            why = damage(p)
            if why is None:
                found.append(p)
            elif (p / STATE_FILE).exists():  # a save that ended before state.json is routine
                self.skipped.append((p, why))
        return found

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
        why = damage(path)
        if why is not None:
            raise FileNotFoundError(
                f"checkpoint.resume={resume!r}: no complete checkpoint there ({why}); "
                "allowed: 'auto', 'never' or a checkpoint folder such as "
                f"{self.path_for(50)}"
            )
        return path

    @staticmethod
    def write_state(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
        """Write ``state.json`` atomically: the checkpoint is complete from this moment."""
        target = Path(path) / STATE_FILE
        tmp = target.with_name(f".{STATE_FILE}.tmp")
        state = {**state, MANIFEST: _manifest(Path(path))}
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
