"""Weight broadcast from learner rank 0 to the rollout workers (DESIGN §7).

Two implementations behind one small protocol, chosen once with :func:`get_broadcast`
(keyed by ``LearnerConfig.broadcast``):

- ``torch_dist``: a dedicated process group between learner rank 0 (rank 0) and the
  workers (ranks 1..N), built from a ``TCPStore`` rendezvous without touching the default
  group (gloo on CPU, NCCL on GPU). Each update sends a header ``[version, buckets, crc]``
  and then one broadcast per flattened bucket.
- ``object_store``: rank 0 puts all buckets with one ``ray.put``; every worker gets the
  same object.

Both move the tensors described by a :class:`Manifest` (names, shapes, dtypes, grouped
into single-dtype buckets of at most ``bucket_mb``), which the workers receive once at
connection time. A worker holds a :class:`WeightClient` over a :class:`WeightTarget`
(its rollout engine, or a plain module through :class:`ModuleTarget`): ``receive`` stages a
complete update, ``apply_pending`` hands it to the target's ``update_weights`` in one step
between generation batches, so a generation never sees half an update.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "BROADCASTS",
    "BroadcastImpl",
    "Manifest",
    "ModuleTarget",
    "ObjectStoreBroadcast",
    "ObjectStoreReceiver",
    "SyncStats",
    "TensorSpec",
    "TorchDistBroadcast",
    "TorchDistReceiver",
    "TransportSpec",
    "WeightBroadcast",
    "WeightClient",
    "WeightReceiver",
    "WeightTarget",
    "adopt_named_tensors",
    "build_manifest",
    "flatten_bucket",
    "free_port",
    "get_broadcast",
    "iter_buckets",
    "load_named_tensors",
    "module_weight_specs",
    "register_broadcast",
    "unflatten_bucket",
]


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an update: parameter name, full (unpartitioned) shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Manifest:
    """What every update carries, in order: ``buckets`` are index tuples into ``specs``."""

    specs: tuple[TensorSpec, ...]
    buckets: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def bucket_specs(self, b: int) -> list[TensorSpec]:
        return [self.specs[i] for i in self.buckets[b]]

    def checksum(self) -> int:
        """A CRC of names, shapes, dtypes and bucket layout (both ends must agree)."""
        text = repr([(s.name, s.shape, str(s.dtype)) for s in self.specs]) + repr(self.buckets)
        return zlib.crc32(text.encode())


def build_manifest(
    tensors: Iterable[tuple[str, Sequence[int], torch.dtype]], bucket_mb: float
) -> Manifest:
    """Group ``(name, shape, dtype)`` into single-dtype buckets of at most ``bucket_mb`` MiB.

    Order is kept within a dtype; a tensor larger than a bucket gets a bucket of its own.
    """
    if bucket_mb <= 0:
        raise ValueError(f"bad value for bucket_mb: {bucket_mb}; allowed: a number > 0")
    limit = int(bucket_mb * 2**20)
    specs = tuple(TensorSpec(n, tuple(int(x) for x in s), d) for n, s, d in tensors)
    buckets: list[tuple[int, ...]] = []
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, spec in enumerate(specs):
        members, size = open_.get(spec.dtype, ([], 0))
        if members and size + spec.nbytes > limit:
            buckets.append(tuple(members))
            members, size = [], 0
        open_[spec.dtype] = ([*members, i], size + spec.nbytes)
    buckets.extend(tuple(m) for m, _ in open_.values() if m)
    buckets.sort(key=lambda b: b[0])
    return Manifest(specs, tuple(buckets))


def flatten_bucket(tensors: Sequence[Tensor]) -> Tensor:
    """One contiguous 1-D tensor holding ``tensors`` back to back (all of one dtype)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_bucket(flat: Tensor, specs: Sequence[TensorSpec]) -> list[Tensor]:
    """Views of ``flat`` shaped as ``specs`` (the inverse of :func:`flatten_bucket`)."""
    total = sum(s.numel for s in specs)
    if total != flat.numel():
        raise ValueError(f"bucket holds {flat.numel()} elements, manifest says {total}")
    out, offset = [], 0
    for s in specs:
        out.append(flat[offset : offset + s.numel].view(s.shape))
        offset += s.numel
    return out


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class TransportSpec:
    """How one endpoint joins the weight-transport group: rank 0 is the learner, 1..N the workers."""

    manifest: Manifest
    method: str = "torch_dist"
    rank: int = 0
    world_size: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    backend: str = "gloo"
    timeout_s: float = 300.0
    device: str = "cpu"


@dataclass
class SyncStats:
    """One update as seen by the learner: ``sync/seconds``, ``sync/bytes``, ``sync/version``."""

    version: int
    seconds: float
    bytes: int

    def metrics(self) -> dict[str, float]:
        return {
            "sync/seconds": self.seconds,
            "sync/bytes": float(self.bytes),
            "sync/version": float(self.version),
        }


class WeightBroadcast(Protocol):
    """Learner-rank-0 end. ``streams``: the workers must receive while ``push`` runs."""

    streams: ClassVar[bool]

    def open(self, spec: TransportSpec) -> None: ...

    def push(self, buckets: Iterable[Sequence[Tensor]], version: int) -> tuple[SyncStats, Any]:
        """Send ``buckets`` (each the manifest bucket's tensors, in manifest order; a bucket's
        tensors need only stay valid until the next one is drawn); returns stats and the
        workers' handle."""
        ...

    def close(self) -> None: ...


class WeightReceiver(Protocol):
    """Worker end: ``receive`` returns the update's tensors by name."""

    def open(self, spec: TransportSpec) -> None: ...

    def receive(self, handle: Any, version: int) -> dict[str, Tensor]: ...

    def applied(self, version: int, *, adopted: bool) -> None:
        """The client applied ``version``; ``adopted``: its target now aliases the received
        tensors instead of holding a copy (only transports that share memory care)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BroadcastImpl:
    sender: type
    receiver: type


BROADCASTS: dict[str, BroadcastImpl] = {}


def register_broadcast(name: str, sender: type, receiver: type) -> None:
    """Register a sender/receiver pair under a ``learner.broadcast`` value."""
    if name in BROADCASTS:
        raise ValueError(f"broadcast {name!r} registered twice")
    BROADCASTS[name] = BroadcastImpl(sender, receiver)


def get_broadcast(name: str) -> BroadcastImpl:
    """The implementation registered under ``name``; the error names the allowed values."""
    try:
        return BROADCASTS[name]
    except KeyError:
        allowed = ", ".join(sorted(BROADCASTS))
        raise KeyError(f"bad value for 'learner.broadcast': {name!r}; allowed: {allowed}") from None


# --------------------------------------------------------------------------- torch.distributed


def _stateless_group(spec: TransportSpec) -> tuple[dist.ProcessGroup, dist.Store]:
    """A process group of its own (not the default one), rendezvous through a ``TCPStore``."""
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    store = dist.TCPStore(
        spec.host,
        spec.port,
        spec.world_size,
        spec.rank == 0,
        timeout=timeout,
        wait_for_workers=True,
    )
    prefixed = dist.PrefixStore("embr_weight_sync", store)
    if spec.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, spec.rank, spec.world_size, opts)
    elif spec.backend == "gloo":
        group = dist.ProcessGroupGloo(prefixed, spec.rank, spec.world_size, timeout)
    else:
        raise ValueError(f"bad value for sync backend: {spec.backend!r}; allowed: 'gloo', 'nccl'")
    return group, store


def _broadcast(group: dist.ProcessGroup, tensor: Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


class _TorchDistBase:
    def __init__(self) -> None:
        self.group: dist.ProcessGroup | None = None
        self.store: dist.Store | None = None  # must outlive the group
        self.spec: TransportSpec | None = None

    def open(self, spec: TransportSpec) -> None:
        self.spec = spec
        self.group, self.store = _stateless_group(spec)

    def _ready(self) -> tuple[dist.ProcessGroup, TransportSpec]:
        if self.group is None or self.spec is None:
            raise RuntimeError("weight-transport group is not open; call open(spec) first")
        return self.group, self.spec

    def close(self) -> None:
        if self.group is not None and hasattr(self.group, "shutdown"):
            self.group.shutdown()
        self.group = self.store = None


class TorchDistBroadcast(_TorchDistBase):
    """Rank 0 of a dedicated gloo/NCCL group: header, then one broadcast per bucket."""

    streams: ClassVar[bool] = True

    def push(self, buckets: Iterable[Sequence[Tensor]], version: int) -> tuple[SyncStats, Any]:
        group, spec = self._ready()
        start = time.perf_counter()
        header = torch.tensor(
            [version, len(spec.manifest.buckets), spec.manifest.checksum()],
            dtype=torch.int64,
            device=spec.device,
        )
        _broadcast(group, header)
        sent = 0
        for tensors in buckets:
            flat = flatten_bucket(tensors).to(spec.device).contiguous()
            _broadcast(group, flat)
            sent += flat.numel() * flat.element_size()
        return SyncStats(version, time.perf_counter() - start, sent), None


class TorchDistReceiver(_TorchDistBase):
    """Rank >= 1 of the dedicated group; receives into freshly allocated buckets."""

    def receive(self, handle: Any, version: int) -> dict[str, Tensor]:
        group, spec = self._ready()
        m = spec.manifest
        header = torch.zeros(3, dtype=torch.int64, device=spec.device)
        _broadcast(group, header)
        got_version, num_buckets, crc = (int(x) for x in header.tolist())
        if num_buckets != len(m.buckets) or crc != m.checksum():
            raise RuntimeError(
                f"weight update v{got_version} does not match this worker's manifest "
                f"({num_buckets} buckets, crc {crc}; expected {len(m.buckets)}, {m.checksum()})"
            )
        if got_version != version:
            raise RuntimeError(f"expected weight version {version}, learner sent {got_version}")
        out: dict[str, Tensor] = {}
        for b in range(len(m.buckets)):
            specs = m.bucket_specs(b)
            flat = torch.empty(
                sum(s.numel for s in specs), dtype=specs[0].dtype, device=spec.device
            )
            _broadcast(group, flat)
            out.update(zip((s.name for s in specs), unflatten_bucket(flat, specs), strict=True))
        return out

    def applied(self, version: int, *, adopted: bool) -> None:
        """Nothing to release: every update arrives in fresh memory."""


# --------------------------------------------------------------------------- Ray object store


class ObjectStoreBroadcast:
    """One ``ray.put`` of ``(version, crc, [bucket bytes...])``; the handle is its ObjectRef."""

    streams: ClassVar[bool] = False

    def __init__(self) -> None:
        self.spec: TransportSpec | None = None

    def open(self, spec: TransportSpec) -> None:
        self.spec = spec

    def push(self, buckets: Iterable[Sequence[Tensor]], version: int) -> tuple[SyncStats, Any]:
        import ray

        if self.spec is None:
            raise RuntimeError("object-store broadcast is not open; call open(spec) first")
        start = time.perf_counter()
        # Raw bytes as NumPy: zero-copy in the object store, and bf16 survives the trip.
        arrays = [
            flatten_bucket(tensors).cpu().contiguous().view(torch.uint8).numpy()
            for tensors in buckets
        ]
        ref = ray.put((version, self.spec.manifest.checksum(), arrays))
        sent = sum(a.nbytes for a in arrays)
        return SyncStats(version, time.perf_counter() - start, sent), ref

    def close(self) -> None:
        self.spec = None


class ObjectStoreReceiver:
    """Gets the payload (or takes it already resolved by Ray) and views it by the manifest."""

    def __init__(self) -> None:
        self.spec: TransportSpec | None = None

    def open(self, spec: TransportSpec) -> None:
        self.spec = spec

    def receive(self, handle: Any, version: int) -> dict[str, Tensor]:
        import ray

        if self.spec is None:
            raise RuntimeError("object-store receiver is not open; call open(spec) first")
        payload = ray.get(handle) if isinstance(handle, ray.ObjectRef) else handle
        got_version, crc, arrays = payload
        m = self.spec.manifest
        if crc != m.checksum() or len(arrays) != len(m.buckets):
            raise RuntimeError(
                f"weight update v{got_version} does not match this worker's manifest"
            )
        if got_version != version:
            raise RuntimeError(f"expected weight version {version}, learner sent {got_version}")
        out: dict[str, Tensor] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only object-store memory
            for b, arr in enumerate(arrays):
                specs = m.bucket_specs(b)
                flat = torch.from_numpy(arr).view(specs[0].dtype).to(self.spec.device)
                out.update(zip((s.name for s in specs), unflatten_bucket(flat, specs), strict=True))
        return out

    def applied(self, version: int, *, adopted: bool) -> None:
        """Nothing to release: the object store frees a payload when no reference is left."""

    def close(self) -> None:
        self.spec = None


register_broadcast("torch_dist", TorchDistBroadcast, TorchDistReceiver)
register_broadcast("object_store", ObjectStoreBroadcast, ObjectStoreReceiver)


# --------------------------------------------------------------------------- worker side


class WeightTarget(Protocol):
    """What a :class:`WeightClient` applies updates to: a rollout engine, or a module.

    A target may also define ``adopt_weights(state_dict) -> bool``: take the tensors by
    reference (no copy) where it can, returning whether it did; a transport that shares
    memory (``shared_memory``) then costs the worker no copy at all. ``weight_specs`` lists the tensors ``update_weights`` accepts by name (full shapes; the
    dtype may differ from the sender's, values are cast on load), or None where the target
    cannot list them (the manifest is then not checked at connection time).
    """

    def weight_specs(self) -> Sequence[TensorSpec] | None: ...

    def update_weights(self, state_dict: Mapping[str, Tensor]) -> None: ...


def module_weight_specs(module: nn.Module) -> list[TensorSpec]:
    """Name, shape and dtype of every parameter and buffer of ``module``."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in named]


@torch.no_grad()
def load_named_tensors(module: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` into ``module``'s parameters and buffers of the same names, in place.

    A subset is fine (a LoRA adapter alone, say); an unknown name or a wrong shape fails
    before anything is copied. Values are cast to each target's dtype and device.
    """
    targets = _checked_targets(module, tensors)
    for name, value in tensors.items():
        targets[name].copy_(value)


def _checked_targets(module: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``module``'s parameters and buffers by name, once every name in ``tensors`` is found
    with the same shape (else ``KeyError`` / ``ValueError`` naming the weight)."""
    targets = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    for name, value in tensors.items():
        if name not in targets:
            raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
        if tuple(value.shape) != tuple(targets[name].shape):
            raise ValueError(
                f"weight {name!r} has shape {tuple(value.shape)}, "
                f"the model's is {tuple(targets[name].shape)}"
            )
    return targets


@torch.no_grad()
def adopt_named_tensors(module: nn.Module, tensors: Mapping[str, Tensor]) -> bool:
    """Point ``module``'s parameters and buffers at ``tensors`` (no copy) where dtype and
    device match, copy the rest (:func:`load_named_tensors`'s checks first); returns whether
    any tensor was adopted, i.e. whether the module now aliases the received memory."""
    targets = _checked_targets(module, tensors)
    adopted = False
    for name, value in tensors.items():
        t = targets[name]
        if value.dtype == t.dtype and value.device == t.device:
            t.data = value
            adopted = True
        else:
            t.copy_(value)
    return adopted


class ModuleTarget:
    """A plain ``nn.Module`` as a :class:`WeightTarget` (copies updates in place by name)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def weight_specs(self) -> list[TensorSpec]:
        return module_weight_specs(self.module)

    def update_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        load_named_tensors(self.module, state_dict)

    def adopt_weights(self, state_dict: Mapping[str, Tensor]) -> bool:
        return adopt_named_tensors(self.module, state_dict)


def _check_manifest(manifest: Manifest, have: Sequence[TensorSpec] | None) -> None:
    """Every manifest tensor must exist at the receiver with the same full shape."""
    if have is None:
        return
    by_name = {s.name: s for s in have}
    missing = [s.name for s in manifest.specs if s.name not in by_name]
    if missing:
        raise KeyError(
            f"this worker's model has no parameter {missing[0]!r} (of {len(missing)} missing)"
        )
    for s in manifest.specs:
        if s.shape != tuple(by_name[s.name].shape):
            raise ValueError(
                f"weight {s.name!r}: the learner sends shape {s.shape}, "
                f"this worker's model has {tuple(by_name[s.name].shape)}"
            )


@dataclass
class _Pending:
    version: int
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    # Received into memory the transport shares (read-only, reused by later versions): the
    # target may adopt it rather than copy, and the receiver is told what it still holds.
    shared: bool = False


class WeightClient:
    """The part of a rollout worker (or the evaluator) that takes weight updates.

    ``receive`` stages a whole broadcast and ``stage`` an in-process update (nothing changes
    yet); ``apply_pending``, called between generation batches, hands the newest staged
    update to ``target.update_weights`` under a lock and returns its version. ``target`` is
    a :class:`WeightTarget` (a rollout engine) or an ``nn.Module`` (wrapped in
    :class:`ModuleTarget`). ``version`` is the version the target holds now.
    """

    def __init__(self, target: WeightTarget | nn.Module, *, version: int = -1) -> None:
        self.target: WeightTarget = (
            ModuleTarget(target) if isinstance(target, nn.Module) else target
        )
        self.receiver: WeightReceiver | None = None
        self.version = version
        self._pending: _Pending | None = None
        self._lock = threading.Lock()
        # The shared-memory tensors the target aliases now (adopted), if any.
        self._adopted: Mapping[str, Tensor] | None = None

    @property
    def latest_version(self) -> int:
        """The version the next apply leaves the target at (staged, else applied)."""
        with self._lock:
            return self._pending.version if self._pending is not None else self.version

    def connect(self, spec: TransportSpec) -> None:
        """Join the weight-transport group (blocks until the learner and every worker have joined)."""
        _check_manifest(spec.manifest, self.target.weight_specs())
        self.close()
        self.receiver = get_broadcast(spec.method).receiver()
        self.receiver.open(spec)

    def stage(self, tensors: Mapping[str, Tensor], version: int, *, shared: bool = False) -> int:
        """Stage ``tensors`` as ``version`` (replacing an unapplied older one); returns bytes.

        ``shared``: the tensors live in the transport's shared memory (see ``_Pending``)."""
        with self._lock:
            latest = self._pending.version if self._pending is not None else self.version
            if version < latest:
                raise ValueError(
                    f"weight version {version} is older than the worker's version {latest}; "
                    "versions must not go back"
                )
            self._pending = _Pending(version, tensors, shared)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def receive(self, handle: Any, version: int) -> int:
        """Receive broadcast ``version`` and stage it; returns the staged bytes."""
        if self.receiver is None:
            raise RuntimeError(
                "receive before connect: this worker has not joined the weight transport"
            )
        shared = bool(getattr(self.receiver, "shares_memory", False))
        return self.stage(self.receiver.receive(handle, version), version, shared=shared)

    @torch.no_grad()
    def apply_pending(self) -> int | None:
        """Apply the staged update to the target; returns its version, or None if none is staged."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return None
            adopt = getattr(self.target, "adopt_weights", None) if pending.shared else None
            adopted = False
            if adopt is not None:
                adopted = bool(adopt(pending.tensors))
            else:
                self.target.update_weights(pending.tensors)
            self._adopted = pending.tensors if adopted else None
            self.version = pending.version
            if pending.shared and self.receiver is not None:
                self.receiver.applied(pending.version, adopted=adopted)
            return pending.version

    def close(self) -> None:
        """Leave the transport; weights the target adopted from it are copied out first
        (the transport may rewrite that memory once this receiver no longer holds it)."""
        with self._lock:
            if self._adopted is not None:
                private = {n: t.clone() for n, t in self._adopted.items()}
                self.target.adopt_weights(private)  # type: ignore[attr-defined]
                self._adopted = None
            if self._pending is not None and self._pending.shared:
                self._pending = None  # staged in shared memory: gone with the receiver
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


def iter_buckets(manifest: Manifest, tensors: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """The buckets of ``tensors`` (aligned with ``manifest.specs``) as :meth:`WeightBroadcast.push`
    takes them, for local senders."""
    for bucket in manifest.buckets:
        yield [tensors[i] for i in bucket]


# The same-node transports (shared_memory, cuda_ipc) register themselves on import.
from embr_rl.core import transport_local  # noqa: E402, F401
