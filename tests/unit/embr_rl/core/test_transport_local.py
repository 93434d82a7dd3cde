"""The shared-memory weight transport: one copy per update, adoption, the slot ring, cleanup."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from embr_rl.core.transport import (
    TransportSpec,
    WeightClient,
    build_manifest,
    free_port,
    get_broadcast,
    iter_buckets,
)
from embr_rl.core.transport_local import (
    SHM_DIR,
    SharedMemoryBroadcast,
    sweep_stale_segments,
)

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm")


class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3, 5, dtype=dtype), requires_grad=False)
        self.b = nn.Parameter(torch.zeros(7, dtype=dtype), requires_grad=False)
        self.register_buffer("c", torch.zeros(2, dtype=dtype))


def _weights(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3, 5, generator=g),
        torch.randn(7, generator=g),
        torch.randn(2, generator=g),
    ]


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in [*m.named_parameters(), *m.named_buffers()]}


def _aliases_shared_memory(m: nn.Module) -> bool:
    """Whether every weight of ``m`` is a view of foreign memory (a mapped segment: its
    storage cannot be resized, unlike memory torch allocated)."""
    return all(not t.untyped_storage().resizable() for t in [*m.parameters(), *m.buffers()])


@pytest.fixture()
def link():
    """A sender and ``n`` clients over one control segment (world = n + 1)."""
    made: list[tuple[SharedMemoryBroadcast, list[WeightClient]]] = []

    def make(models: list[nn.Module]) -> tuple[SharedMemoryBroadcast, list[WeightClient], list]:
        names = [(n, tuple(t.shape), t.dtype) for n, t in _state(_Net()).items()]
        manifest = build_manifest(names, bucket_mb=64 / 2**20)  # several buckets
        port = free_port()
        world = len(models) + 1
        specs = [
            TransportSpec(manifest, "shared_memory", r, world, "127.0.0.1", port, "gloo", 5.0)
            for r in range(world)
        ]
        sender = SharedMemoryBroadcast()
        sender.open(specs[0])
        clients = [WeightClient(m) for m in models]
        for c, spec in zip(clients, specs[1:], strict=True):
            c.connect(spec)
        made.append((sender, clients))
        return sender, clients, specs

    yield make
    for sender, clients in made:
        for c in clients:
            c.close()
        sender.close()


def _push(sender: SharedMemoryBroadcast, seed: int, version: int):
    return sender.push(iter_buckets(sender.spec.manifest, _weights(seed)), version)


def test_receivers_adopt_one_copy_and_see_every_value(link) -> None:
    models = [_Net(), _Net()]
    sender, clients, _ = link(models)
    stats, handle = _push(sender, 1, 1)
    assert stats.bytes == sender.spec.manifest.nbytes and stats.version == 1
    for m, c in zip(models, clients, strict=True):
        assert c.receive(handle, 1) == sender.spec.manifest.nbytes
        assert c.apply_pending() == 1
        for (n, got), want in zip(_state(m).items(), _weights(1), strict=True):
            assert torch.equal(got, want), n
        # Adopted, not copied: the weights are views of the mapped segment.
        assert _aliases_shared_memory(m)
    assert len(sender.slots) == 1


def test_the_ring_never_rewrites_a_slot_a_worker_still_maps(link) -> None:
    fast, slow = _Net(), _Net()
    sender, (cf, cs), _ = link([fast, slow])
    _, h1 = _push(sender, 1, 1)
    for c in (cf, cs):
        c.receive(h1, 1)
        c.apply_pending()
    # The slow worker stays on v1 (busy generating) while v2..v4 are pushed.
    for v in (2, 3, 4):
        _, h = _push(sender, v, v)
        cf.receive(h, v)
        cf.apply_pending()
        cs.receive(h, v)  # staged, not applied
        for got, want in zip(_state(slow).values(), _weights(1), strict=True):
            assert torch.equal(got, want)  # v1's pages were never rewritten
    # Slots needed: v1 (slow applied), the latest staged, the one being written: 3.
    assert len(sender.slots) == 3
    assert cs.apply_pending() == 4
    for got, want in zip(_state(slow).values(), _weights(4), strict=True):
        assert torch.equal(got, want)
    for v in (5, 6, 7):
        _, h = _push(sender, v, v)
        for c in (cf, cs):
            c.receive(h, v)
            c.apply_pending()
    assert len(sender.slots) == 3  # reused, not grown


def test_a_target_of_another_dtype_copies_and_holds_nothing(link) -> None:
    model = _Net(torch.bfloat16)
    sender, (client,), _ = link([model])
    _, h = _push(sender, 1, 1)
    client.receive(h, 1)
    client.apply_pending()
    assert not _aliases_shared_memory(model)  # private copies
    for got, want in zip(_state(model).values(), _weights(1), strict=True):
        assert torch.equal(got, want.bfloat16())
    for v in (2, 3):  # nothing held: the one slot is rewritten each time
        _, h = _push(sender, v, v)
        client.receive(h, v)
        client.apply_pending()
    assert len(sender.slots) == 1


def test_closing_a_client_copies_adopted_weights_out(link) -> None:
    model = _Net()
    sender, (client,), _ = link([model])
    _, h = _push(sender, 1, 1)
    client.receive(h, 1)
    client.apply_pending()
    assert _aliases_shared_memory(model)
    client.close()
    assert not _aliases_shared_memory(model)
    _push(sender, 2, 2)  # rewrites the only slot: the closed client must not see it
    for got, want in zip(_state(model).values(), _weights(1), strict=True):
        assert torch.equal(got, want)


def test_mismatched_updates_are_refused_by_name(link) -> None:
    sender, (client,), _ = link([_Net()])
    _, h = _push(sender, 1, 1)
    with pytest.raises(RuntimeError, match="expected weight version 2"):
        client.receive(h, 2)
    name, version, crc, ino = h
    with pytest.raises(RuntimeError, match="does not match this worker's manifest"):
        client.receive((name, version, crc + 1, ino), 1)
    with pytest.raises(ValueError, match="buckets"):
        sender.push(iter(()), 3)


def test_a_worker_on_another_node_gets_a_named_error() -> None:
    manifest = build_manifest([("b", (7,), torch.float32)], 1.0)
    spec = TransportSpec(manifest, "shared_memory", 1, 2, "127.0.0.1", free_port(), "gloo", 0.1)
    with pytest.raises(RuntimeError, match=r"learner rank 0.s node.*object_store"):
        get_broadcast("shared_memory").receiver().open(spec)
    with pytest.raises(ValueError, match="port"):
        SharedMemoryBroadcast().open(TransportSpec(manifest, "shared_memory"))


def test_segments_of_a_dead_sender_are_swept() -> None:
    code = (
        "import torch, os\n"
        "from embr_rl.core.transport import TransportSpec, build_manifest, iter_buckets\n"
        "from embr_rl.core.transport_local import SharedMemoryBroadcast\n"
        "m = build_manifest([('b', (7,), torch.float32)], 1.0)\n"
        f"s = SharedMemoryBroadcast(); s.open(TransportSpec(m, 'shared_memory', 0, 2, port={free_port()}))\n"
        "s.push(iter_buckets(m, [torch.ones(7)]), 1)\n"
        "print(s.spec.port)\n"
        "os._exit(0)  # no clean-up: a crash\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    port = int(out.stdout.strip())
    left = sorted(p.name for p in SHM_DIR.glob(f"embr_w_{port}_*"))
    assert left == [f"embr_w_{port}_ctl", f"embr_w_{port}_s0"]
    removed = sweep_stale_segments()
    assert set(left) <= set(removed)
    assert not list(SHM_DIR.glob(f"embr_w_{port}_*"))


def test_close_removes_every_name(link) -> None:
    sender, _, specs = link([_Net()])
    _push(sender, 1, 1)
    port = specs[0].port
    assert list(SHM_DIR.glob(f"embr_w_{port}_*"))
    sender.close()
    assert not list(SHM_DIR.glob(f"embr_w_{port}_*"))


def test_a_receiver_follows_a_sender_reopened_on_its_port(link) -> None:
    model = _Net()
    sender, (client,), specs = link([model])
    sender.close()
    sender.open(specs[0])  # a new control segment under the same name
    _, h = _push(sender, 2, 2)
    client.receive(h, 2)
    assert client.apply_pending() == 2
    for got, want in zip(_state(model).values(), _weights(2), strict=True):
        assert torch.equal(got, want)
    # The new control segment records what this receiver maps: the slot is kept.
    _push(sender, 3, 3)
    assert len(sender.slots) == 2


def test_a_control_segment_being_written_is_not_swept() -> None:
    port = free_port()
    ctl = SHM_DIR / f"embr_w_{port}_ctl"
    ctl.write_bytes(bytes(64))  # no magic yet: a sender between create and header
    try:
        assert ctl.name not in sweep_stale_segments()
        assert ctl.name in sweep_stale_segments(unfinished_after_s=0.0)
    finally:
        ctl.unlink(missing_ok=True)
