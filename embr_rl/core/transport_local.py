"""Same-node weight transports (DESIGN §7): ``shared_memory`` (CPU) and ``cuda_ipc`` (GPU).

Both register with :func:`embr_rl.core.transport.register_broadcast` and keep the manifest,
version and CRC checks of the other transports; they differ in where the bytes travel.

``shared_memory``
    Learner rank 0 copies each update once into a POSIX shared-memory segment (a file under
    ``/dev/shm``) laid out tensor by tensor as the manifest says. A receiver maps it read-only
    and hands views to its target, which adopts them as its weights (no copy: every worker
    on the node reads the same pages); a target that cannot adopt copies once. A control
    segment holds, for each receiver, the versions it still maps (applied, staged), so the
    sender rewrites only slots that nobody maps: the slots form a ring that grows to at most
    two per receiver and whose pages stay resident, so an update costs one copy in all.
    Every worker must run on learner rank 0's node.

``cuda_ipc``
    Learner rank 0 keeps one flat CUDA buffer, copies each update into it and hands out its
    CUDA IPC handle (``torch.multiprocessing.reductions``); a receiver that sees the same GPU
    opens the buffer once and copies its views into its own weights device to device. Across
    nodes, ``torch_dist`` with ``learner.sync_backend=nccl`` is the GPU path.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from embr_rl.core.transport import (
    Manifest,
    SyncStats,
    TensorSpec,
    TransportSpec,
    register_broadcast,
)

__all__ = [
    "SHM_DIR",
    "CudaIpcBroadcast",
    "CudaIpcReceiver",
    "SharedMemoryBroadcast",
    "SharedMemoryReceiver",
    "segment_layout",
    "sweep_stale_segments",
]

SHM_DIR = Path("/dev/shm")
_PREFIX = "embr_w_"
_MAGIC = 0x454D4252574D  # "EMBRWM"
_ALIGN = 64
_DATA_OFFSET = 4096  # slot header page; tensor data starts page-aligned
_CTL_ROWS_OFFSET = 64
_NONE = -1


def segment_layout(manifest: Manifest) -> tuple[list[int], int]:
    """Byte offset of each manifest tensor in a slot (``_ALIGN``-aligned, after the header
    page) and the slot's total size."""
    offsets, at = [], _DATA_OFFSET
    for spec in manifest.specs:
        offsets.append(at)
        at += -(-spec.nbytes // _ALIGN) * _ALIGN
    return offsets, at


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _family(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}_*"))


def _read_ctl_pid(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if len(head) < 16 or int.from_bytes(head[:8], "little", signed=True) != _MAGIC:
        return None
    return int.from_bytes(head[8:16], "little", signed=True)


def sweep_stale_segments(*, unfinished_after_s: float = 60.0) -> list[str]:
    """Remove the segments of senders that died without closing (their control segment
    names a process that no longer exists, or was never finished and is older than
    ``unfinished_after_s``: another sender may be writing its header right now); returns the
    removed names."""
    removed: list[str] = []
    for ctl in SHM_DIR.glob(f"{_PREFIX}*_ctl"):
        pid = _read_ctl_pid(ctl)
        if pid is not None and _alive(pid):
            continue
        if pid is None:
            try:
                age = time.time() - ctl.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < unfinished_after_s:
                continue
        prefix = ctl.name[: -len("_ctl")]
        for path in _family(prefix):
            _unlink(path)
            removed.append(path.name)
    return removed


def _map(path: Path, size: int, *, create: bool, writable: bool) -> tuple[mmap.mmap, int]:
    """The file mapped shared (pages faulted in now) and its inode (which file it was)."""
    flags = os.O_RDWR if writable else os.O_RDONLY
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # MAP_POPULATE: fault every page in now, not on the first copy of an update.
        buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=prot)
        return buf, os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _view(buf: mmap.mmap, offset: int, spec: TensorSpec) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mappings are not writable
        flat = torch.frombuffer(buf, dtype=spec.dtype, count=spec.numel, offset=offset)
    return flat.view(spec.shape)


def _words(buf: mmap.mmap, offset: int, count: int) -> Tensor:
    return torch.frombuffer(buf, dtype=torch.int64, count=count, offset=offset)


def _names(spec: TransportSpec) -> tuple[str, str]:
    if spec.port <= 0:
        raise ValueError(
            "the shared_memory broadcast names its segments by TransportSpec.port; "
            f"got port {spec.port}, allowed: a port > 0 (LearnerGroup.connect_workers sets it)"
        )
    prefix = f"{_PREFIX}{spec.port}"
    return prefix, f"{prefix}_ctl"


def _check_handle(manifest: Manifest, got_version: int, crc: int, version: int) -> None:
    """The update's manifest CRC and version must be the ones this receiver expects."""
    if crc != manifest.checksum():
        raise RuntimeError(f"weight update v{got_version} does not match this worker's manifest")
    if got_version != version:
        raise RuntimeError(f"expected weight version {version}, learner sent {got_version}")


def _require_shm() -> None:
    if not SHM_DIR.is_dir():
        raise RuntimeError(
            f"learner.broadcast='shared_memory' needs {SHM_DIR} (Linux shared memory); "
            "allowed here: 'object_store' or 'torch_dist'"
        )


class _Slot:
    """One version's segment on the sender: its mapping, views by manifest index, version."""

    def __init__(self, name: str, manifest: Manifest) -> None:
        offsets, size = segment_layout(manifest)
        self.name = name
        self.buf, _ = _map(SHM_DIR / name, size, create=True, writable=True)
        self.header = _words(self.buf, 0, 4)
        self.header[0] = _MAGIC
        self.header[1] = _NONE
        self.views = [_view(self.buf, o, s) for o, s in zip(offsets, manifest.specs, strict=True)]
        self.version = _NONE


def _close_sender(names: list[str]) -> None:
    for name in names:
        _unlink(SHM_DIR / name)


class SharedMemoryBroadcast:
    """Learner rank 0 of ``shared_memory``: one copy per update into a free slot."""

    streams: ClassVar[bool] = False

    def __init__(self) -> None:
        self.spec: TransportSpec | None = None
        self.slots: list[_Slot] = []
        self._names: list[str] = []
        self._finalizer: weakref.finalize | None = None

    def open(self, spec: TransportSpec) -> None:
        _require_shm()
        self.close()
        sweep_stale_segments()
        prefix, ctl_name = _names(spec)
        pid = _read_ctl_pid(SHM_DIR / ctl_name)
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise RuntimeError(
                f"shared-memory segments {prefix}_* belong to live process {pid}; "
                "two learners cannot share one TransportSpec.port"
            )
        for path in _family(prefix):
            _unlink(path)
        self.spec = spec
        self._prefix = prefix
        self._names = [ctl_name]
        # Unlink the names however this process ends; mappings stay valid until unmapped.
        self._finalizer = weakref.finalize(self, _close_sender, self._names)
        rows = 2 * spec.world_size
        self.ctl, self.ctl_ino = _map(
            SHM_DIR / ctl_name, _CTL_ROWS_OFFSET + 8 * rows, create=True, writable=True
        )
        self.held = _words(self.ctl, _CTL_ROWS_OFFSET, rows)
        self.held.fill_(_NONE)
        head = _words(self.ctl, 0, 4)
        head[1], head[2], head[3] = os.getpid(), spec.world_size, spec.manifest.checksum()
        head[0] = _MAGIC  # last: receivers wait for it

    def _free_slot(self) -> _Slot:
        assert self.spec is not None
        held = {int(v) for v in self.held.tolist() if v != _NONE}
        for slot in self.slots:
            if slot.version not in held:
                return slot
        limit = 2 * self.spec.world_size
        if len(self.slots) >= limit:
            raise RuntimeError(
                f"all {limit} shared-memory slots are held by receivers (versions "
                f"{sorted(held)}): a worker has stopped applying weight updates"
            )
        slot = _Slot(f"{self._prefix}_s{len(self.slots)}", self.spec.manifest)
        self._names.append(slot.name)
        self.slots.append(slot)
        return slot

    @torch.no_grad()
    def push(self, buckets: Iterable[Sequence[Tensor]], version: int) -> tuple[SyncStats, Any]:
        if self.spec is None:
            raise RuntimeError("shared-memory broadcast is not open; call open(spec) first")
        m = self.spec.manifest
        start = time.perf_counter()
        slot = self._free_slot()
        slot.header[1] = _NONE  # a half-written slot never shows a version
        count = 0
        for b, tensors in enumerate(buckets):
            if b >= len(m.buckets) or len(tensors) != len(m.buckets[b]):
                raise ValueError(f"update v{version} does not match the manifest at bucket {b}")
            for i, t in zip(m.buckets[b], tensors, strict=True):
                slot.views[i].copy_(t.reshape(m.specs[i].shape))
            count += 1
        if count != len(m.buckets):
            raise ValueError(
                f"update v{version} has {count} buckets, the manifest {len(m.buckets)}"
            )
        slot.header[2] = m.checksum()
        slot.header[1] = version
        slot.version = version
        # The control segment's inode tells a receiver which open of this port it belongs to.
        handle = (slot.name, version, m.checksum(), self.ctl_ino)
        return SyncStats(version, time.perf_counter() - start, m.nbytes), handle

    def close(self) -> None:
        self.slots = []
        if self._finalizer is not None:
            self._finalizer()  # unlink every name now
            self._finalizer = None
        self.spec = None


class SharedMemoryReceiver:
    """A worker's end of ``shared_memory``: maps slots read-only, returns views of them and
    records in the control segment which versions it still maps."""

    shares_memory: ClassVar[bool] = True

    def __init__(self) -> None:
        self.spec: TransportSpec | None = None
        self._slots: dict[str, tuple[mmap.mmap, list[Tensor]]] = {}

    def open(self, spec: TransportSpec) -> None:
        _require_shm()
        if spec.rank < 1:
            raise ValueError(f"a receiver has rank >= 1, got {spec.rank}")
        self.spec = spec
        self._attach(wait=True)

    def _attach(self, *, wait: bool) -> None:
        """Map the sender's current control segment (waiting up to the spec's timeout for it)
        and clear this receiver's row; slots of an earlier sender are forgotten."""
        assert self.spec is not None
        spec = self.spec
        _, ctl_name = _names(spec)
        path = SHM_DIR / ctl_name
        deadline = time.monotonic() + (spec.timeout_s if wait else 0.0)
        while True:
            found = self._try_ctl(path, spec)
            if found is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no shared-memory segment {path} after {spec.timeout_s:.0f} s: "
                    "learner.broadcast='shared_memory' needs every rollout worker on learner "
                    "rank 0's node (use 'object_store' or 'torch_dist' across nodes)"
                )
            time.sleep(0.02)
        self.ctl, self.ctl_ino = found
        self.row = _words(self.ctl, _CTL_ROWS_OFFSET + 16 * spec.rank, 2)  # [applied, staged]
        self.row.fill_(_NONE)
        self._slots = {}

    @staticmethod
    def _try_ctl(path: Path, spec: TransportSpec) -> tuple[mmap.mmap, int] | None:
        size = _CTL_ROWS_OFFSET + 16 * spec.world_size
        try:
            if path.stat().st_size < size:
                return None
            ctl, ino = _map(path, size, create=False, writable=True)
        except FileNotFoundError:
            return None
        head = _words(ctl, 0, 4).tolist()
        if head[0] != _MAGIC:
            return None
        if head[2] != spec.world_size or head[3] != spec.manifest.checksum():
            raise RuntimeError(
                f"shared-memory control segment {path} is for {head[2]} ranks and manifest "
                f"crc {head[3]}; this worker expects {spec.world_size} and "
                f"{spec.manifest.checksum()}"
            )
        return ctl, ino

    def _slot(self, name: str) -> tuple[mmap.mmap, list[Tensor]]:
        assert self.spec is not None
        if name not in self._slots:
            offsets, size = segment_layout(self.spec.manifest)
            buf, _ = _map(SHM_DIR / name, size, create=False, writable=False)
            views = [
                _view(buf, o, s) for o, s in zip(offsets, self.spec.manifest.specs, strict=True)
            ]
            self._slots[name] = (buf, views)
        return self._slots[name]

    def receive(self, handle: Any, version: int) -> dict[str, Tensor]:
        if self.spec is None:
            raise RuntimeError("shared-memory receiver is not open; call open(spec) first")
        name, got_version, crc, ctl_ino = handle
        m = self.spec.manifest
        _check_handle(m, got_version, crc, version)
        if ctl_ino != self.ctl_ino:
            # Connected while an earlier sender on this port was still closing: follow the
            # one that sent this update (its control segment exists before any push).
            self._attach(wait=False)
            if ctl_ino != self.ctl_ino:
                raise RuntimeError(f"weight update v{version} comes from a closed sender")
        self.row[1] = version  # before reading: from now on the sender keeps this slot
        buf, views = self._slot(name)
        header = _words(buf, 0, 3).tolist()
        if header[1] != version or header[2] != crc:
            raise RuntimeError(
                f"shared-memory slot {name} holds version {header[1]}, not {version}: the "
                "learner rewrote it before this worker received it"
            )
        return {s.name: v for s, v in zip(m.specs, views, strict=True)}

    def applied(self, version: int, *, adopted: bool) -> None:
        if self.spec is None:
            return
        self.row[0] = version if adopted else _NONE
        if int(self.row[1]) == version:
            self.row[1] = _NONE

    def close(self) -> None:
        # Mappings are not closed: a target may still alias them (WeightClient copies its
        # weights out before it closes a receiver; the pages go when the last view goes).
        if self.spec is not None:
            self.row.fill_(_NONE)
        self._slots = {}
        self.spec = None


# --------------------------------------------------------------------------- CUDA IPC


class CudaIpcBroadcast:
    """Learner rank 0 of ``cuda_ipc``: one flat CUDA buffer, shared once by IPC handle."""

    streams: ClassVar[bool] = False

    def __init__(self) -> None:
        self.spec: TransportSpec | None = None
        self.flat: Tensor | None = None
        self._ipc: Any = None

    def open(self, spec: TransportSpec) -> None:
        if not torch.cuda.is_available() or not spec.device.startswith("cuda"):
            raise RuntimeError(
                "learner.broadcast='cuda_ipc' needs CUDA on the learner and the workers "
                f"(device {spec.device!r}); allowed on CPU: 'shared_memory', 'object_store', "
                "'torch_dist'"
            )
        from torch.multiprocessing.reductions import reduce_tensor

        offsets, size = segment_layout(spec.manifest)
        self.spec = spec
        self.flat = torch.empty(size, dtype=torch.uint8, device=spec.device)
        self.views = [
            self.flat[o : o + s.nbytes].view(s.dtype).view(s.shape)
            for o, s in zip(offsets, spec.manifest.specs, strict=True)
        ]
        self._ipc = reduce_tensor(self.flat)

    @torch.no_grad()
    def push(self, buckets: Iterable[Sequence[Tensor]], version: int) -> tuple[SyncStats, Any]:
        if self.spec is None or self.flat is None:
            raise RuntimeError("CUDA IPC broadcast is not open; call open(spec) first")
        m = self.spec.manifest
        start = time.perf_counter()
        for b, tensors in enumerate(buckets):
            for i, t in zip(m.buckets[b], tensors, strict=True):
                self.views[i].copy_(t.reshape(m.specs[i].shape), non_blocking=True)
        torch.cuda.current_stream(self.flat.device).synchronize()
        handle = (self._ipc, version, m.checksum())
        return SyncStats(version, time.perf_counter() - start, m.nbytes), handle

    def close(self) -> None:
        self.flat = self._ipc = None
        self.spec = None


class CudaIpcReceiver:
    """A worker's end of ``cuda_ipc``: opens the learner's buffer once and copies out of it
    on receive (so the learner may rewrite the buffer for the next version)."""

    shares_memory: ClassVar[bool] = False

    def __init__(self) -> None:
        self.spec: TransportSpec | None = None
        self._views: list[Tensor] | None = None

    def open(self, spec: TransportSpec) -> None:
        self.spec = spec
        self._views = None

    def receive(self, handle: Any, version: int) -> dict[str, Tensor]:
        if self.spec is None:
            raise RuntimeError("CUDA IPC receiver is not open; call open(spec) first")
        (rebuild, args), got_version, crc = handle
        m = self.spec.manifest
        _check_handle(m, got_version, crc, version)
        if self._views is None:
            flat = rebuild(*args)
            offsets, _ = segment_layout(m)
            self._views = [
                flat[o : o + s.nbytes].view(s.dtype).view(s.shape)
                for o, s in zip(offsets, m.specs, strict=True)
            ]
        out = {s.name: v.clone() for s, v in zip(m.specs, self._views, strict=True)}
        torch.cuda.synchronize()
        return out

    def applied(self, version: int, *, adopted: bool) -> None:
        """Nothing to release: ``receive`` returned private copies."""

    def close(self) -> None:
        self._views = None
        self.spec = None


register_broadcast("shared_memory", SharedMemoryBroadcast, SharedMemoryReceiver)
register_broadcast("cuda_ipc", CudaIpcBroadcast, CudaIpcReceiver)
