"""Where buffer snapshots live: a small storage seam (Parquet now) and crash-safe snapshots.

A snapshot is written to a hidden temporary file in the target directory, flushed and
fsynced, renamed over its final name (atomic on POSIX), and the directory is fsynced.
A process killed at any point therefore leaves either the previous snapshots or the new
one on disk, never half a file under a snapshot name.
"""

from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_META_KEY = b"embr_buffer"


class BufferStorage(ABC):
    """Reads and writes one table (with a small JSON metadata dict) as one file."""

    suffix: str = ""

    @abstractmethod
    def write(self, table: pa.Table, file: Any, metadata: dict[str, Any]) -> None:
        """Write ``table`` and ``metadata`` to an open binary file object."""

    @abstractmethod
    def read(self, path: str | os.PathLike[str]) -> tuple[pa.Table, dict[str, Any]]:
        """Read back what :meth:`write` wrote."""


class ParquetStorage(BufferStorage):
    """One Parquet file; metadata rides in the Arrow schema metadata."""

    suffix = ".parquet"

    def __init__(self, compression: str = "zstd") -> None:
        self.compression = compression

    def write(self, table: pa.Table, file: Any, metadata: dict[str, Any]) -> None:
        meta = dict(table.schema.metadata or {})
        meta[_META_KEY] = json.dumps(metadata).encode()
        pq.write_table(table.replace_schema_metadata(meta), file, compression=self.compression)

    def read(self, path: str | os.PathLike[str]) -> tuple[pa.Table, dict[str, Any]]:
        table = pq.read_table(path)
        meta = dict(table.schema.metadata or {})
        info = json.loads(meta.pop(_META_KEY, b"{}"))
        return table.replace_schema_metadata(meta or None), info


STORAGES: dict[str, Callable[[], BufferStorage]] = {"parquet": ParquetStorage}


def register_storage(name: str, factory: Callable[[], BufferStorage]) -> None:
    """Make ``factory`` available as ``buffer.storage=<name>``."""
    STORAGES[name] = factory


def make_storage(name: str) -> BufferStorage:
    """The storage registered as ``name``; the error lists the registered names."""
    if name not in STORAGES:
        raise ValueError(f"unknown buffer storage {name!r}; allowed: {', '.join(sorted(STORAGES))}")
    return STORAGES[name]()


def write_atomic(
    storage: BufferStorage, table: pa.Table, path: str | os.PathLike[str], metadata: dict[str, Any]
) -> Path:
    """Write ``table`` to ``path`` so that ``path`` is either absent, old, or complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            storage.write(table, f, metadata)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


class SnapshotStore:
    """Numbered snapshots ``snapshot-000042<suffix>`` in one directory, the newest ``keep`` kept."""

    def __init__(
        self, directory: str | os.PathLike[str], storage: BufferStorage, keep: int = 2
    ) -> None:
        if keep < 1:
            raise ValueError(f"bad value for keep: {keep}; allowed: an integer >= 1")
        self.directory = Path(directory)
        self.storage = storage
        self.keep = keep
        self._pattern = re.compile(r"snapshot-(\d+)" + re.escape(storage.suffix) + "$")

    def snapshots(self) -> list[Path]:
        """Complete snapshot files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = self._pattern.fullmatch(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def clean_temporary(self) -> int:
        """Delete leftovers of interrupted writes; return how many there were."""
        if not self.directory.is_dir():
            return 0
        leftovers = [p for p in self.directory.iterdir() if p.name.startswith(".snapshot-")]
        for p in leftovers:
            p.unlink(missing_ok=True)
        return len(leftovers)

    def save(self, table: pa.Table, metadata: dict[str, Any]) -> Path:
        """Write the next numbered snapshot atomically, then prune the oldest beyond ``keep``."""
        existing = self.snapshots()
        number = int(self._pattern.fullmatch(existing[-1].name).group(1)) + 1 if existing else 0
        path = write_atomic(
            self.storage,
            table,
            self.directory / f"snapshot-{number:06d}{self.storage.suffix}",
            metadata,
        )
        for old in self.snapshots()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[pa.Table, dict[str, Any], Path] | None:
        """The newest readable snapshot (older ones are tried if the newest is unreadable)."""
        for path in reversed(self.snapshots()):
            try:
                table, meta = self.storage.read(path)
            except (OSError, pa.ArrowException) as exc:
                log.warning("skipping unreadable buffer snapshot %s: %s", path, exc)
                continue
            return table, meta, path
        return None
