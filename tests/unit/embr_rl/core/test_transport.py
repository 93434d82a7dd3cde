"""Manifest, buckets and both endpoints of the torch.distributed path (threads, gloo)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pytest
import torch

from embr_rl.core.transport import (
    TensorSpec,
    TorchDistBroadcast,
    TransportSpec,
    WeightClient,
    build_manifest,
    flatten_bucket,
    free_port,
    get_broadcast,
    iter_buckets,
    unflatten_bucket,
)


def _named(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]


def test_buckets_respect_size_and_dtype() -> None:
    tensors = [
        ("a", (256,), torch.float32),
        ("b", (256,), torch.bfloat16),
        ("c", (256,), torch.float32),
    ]
    tensors += [("big", (1024,), torch.float32), ("d", (8,), torch.float32)]
    m = build_manifest(tensors, bucket_mb=2048 / 2**20)  # 2 KiB
    for bucket in m.buckets:
        dtypes = {m.specs[i].dtype for i in bucket}
        assert len(dtypes) == 1
        size = sum(m.specs[i].nbytes for i in bucket)
        assert size <= 2048 or len(bucket) == 1
    assert sorted(i for b in m.buckets for i in b) == list(range(len(tensors)))
    assert (3,) in m.buckets  # 4 KiB tensor alone


def test_flatten_roundtrip(tiny_model: torch.nn.Module) -> None:
    m = build_manifest(_named(tiny_model), bucket_mb=0.05)
    params = [p for _, p in tiny_model.named_parameters()]
    assert len(m.buckets) > 1
    for b, tensors in enumerate(iter_buckets(m, params)):
        flat = flatten_bucket(tensors)
        for spec, view in zip(
            m.bucket_specs(b), unflatten_bucket(flat, m.bucket_specs(b)), strict=True
        ):
            assert torch.equal(view, dict(tiny_model.named_parameters())[spec.name])
    with pytest.raises(ValueError, match="manifest says"):
        unflatten_bucket(flatten_bucket(params[:1]), m.bucket_specs(0)[:1] * 2)


def test_unknown_broadcast_names_key() -> None:
    with pytest.raises(
        KeyError, match=r"learner\.broadcast.*cuda_ipc, object_store, shared_memory, torch_dist"
    ):
        get_broadcast("nccl_magic")


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return other


def test_torch_dist_threads_apply_atomically(tiny_model: torch.nn.Module) -> None:
    learner_model = _perturbed(tiny_model, 1)
    workers = [_perturbed(tiny_model, 2), _perturbed(tiny_model, 3)]
    manifest = build_manifest(_named(learner_model), bucket_mb=0.05)
    port = free_port()
    specs = [
        TransportSpec(manifest, "torch_dist", r, 3, "127.0.0.1", port, "gloo", 60.0)
        for r in range(3)
    ]
    clients = [WeightClient(w) for w in workers]
    sender = TorchDistBroadcast()
    before = [{n: p.clone() for n, p in w.named_parameters()} for w in workers]
    errors: list[BaseException] = []
    staged: list[int] = []

    def run_worker(i: int) -> None:
        try:
            clients[i].connect(specs[i + 1])
            staged.append(clients[i].receive(None, 7))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run_worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    sender.open(specs[0])
    params = [p for _, p in learner_model.named_parameters()]
    stats, handle = sender.push(iter_buckets(manifest, params), 7)
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert handle is None and stats.bytes == manifest.nbytes == staged[0]
    assert set(stats.metrics()) == {"sync/seconds", "sync/bytes", "sync/version"}
    for w, old, client in zip(workers, before, clients, strict=True):
        # Staged only: the model is untouched until the worker applies between batches.
        assert all(torch.equal(p, old[n]) for n, p in w.named_parameters())
        assert client.apply_pending() == 7 and client.version == 7
        assert client.apply_pending() is None
        for n, p in learner_model.named_parameters():
            assert torch.equal(dict(w.named_parameters())[n], p)
        client.close()
    sender.close()


def test_connect_rejects_foreign_manifest(tiny_model: torch.nn.Module) -> None:
    manifest = build_manifest([("no.such.weight", (2,), torch.float32)], 1.0)
    with pytest.raises(KeyError, match=r"no\.such\.weight"):
        WeightClient(tiny_model).connect(TransportSpec(manifest, "object_store"))


class _Target:
    """A receiving engine: lists its weights (or not) and records what it is handed."""

    def __init__(self, specs: Sequence[TensorSpec] | None) -> None:
        self.specs = specs
        self.updates: list[dict[str, torch.Tensor]] = []

    def weight_specs(self) -> Sequence[TensorSpec] | None:
        return self.specs

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.updates.append(dict(state_dict))


def test_client_applies_through_its_target_newest_first() -> None:
    target = _Target([TensorSpec("w", (2,), torch.float32)])
    client = WeightClient(target, version=0)
    assert client.apply_pending() is None and client.latest_version == 0
    assert client.stage({"w": torch.zeros(2)}, 1) == 8
    assert client.stage({"w": torch.ones(2)}, 2) == 8  # replaces the unapplied v1
    assert (client.latest_version, client.version, target.updates) == (2, 0, [])
    with pytest.raises(ValueError, match="older than"):
        client.stage({"w": torch.zeros(2)}, 1)
    assert client.apply_pending() == 2 and client.version == 2
    assert len(target.updates) == 1 and torch.equal(target.updates[0]["w"], torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        client.connect(TransportSpec(build_manifest([("w", (3,), torch.float32)], 1.0)))


def test_object_store_receiver_feeds_a_target_that_cannot_list_its_weights() -> None:
    pytest.importorskip("ray")
    manifest = build_manifest([("a", (3,), torch.float32), ("b", (2,), torch.bfloat16)], 1.0)
    values = [torch.arange(3.0), torch.tensor([1.5, -2.0]).bfloat16()]
    target = _Target(None)  # no manifest check: vLLM's loader checks the names itself
    client = WeightClient(target)
    client.connect(TransportSpec(manifest, "object_store"))
    arrays = [flatten_bucket(b).view(torch.uint8).numpy() for b in iter_buckets(manifest, values)]
    payload = (5, manifest.checksum(), arrays)  # what ray.get of the learner's put returns
    assert client.receive(payload, 5) == manifest.nbytes
    assert client.apply_pending() == 5
    (got,) = target.updates
    assert torch.equal(got["a"], values[0]) and torch.equal(got["b"], values[1])
    with pytest.raises(RuntimeError, match="expected weight version 6"):
        client.receive(payload, 6)
    client.close()


def test_a_module_target_loads_a_subset(tiny_model: torch.nn.Module) -> None:
    client = WeightClient(tiny_model, version=0)
    names = {s.name for s in client.target.weight_specs()}
    assert {n for n, _ in tiny_model.named_parameters()} <= names
    client.stage({"lm_head.weight": torch.zeros_like(tiny_model.lm_head.weight)}, 1)
    assert client.apply_pending() == 1
    assert not tiny_model.lm_head.weight.any()
