"""The GPU weight transports: CUDA IPC to a co-located process, NCCL across two GPUs.

Each receiver is a spawned process (CUDA IPC handles cannot be opened by the process that
made them), holding a WeightClient over a CUDA module; it sends back what it applied.
"""

from __future__ import annotations

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

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(64, 33), requires_grad=False)
        self.b = nn.Parameter(torch.zeros(5, dtype=torch.bfloat16), requires_grad=False)


def _manifest():
    return build_manifest([(n, tuple(p.shape), p.dtype) for n, p in _Net().named_parameters()], 1.0)


def _receiver(spec: TransportSpec, device: str, inbox, outbox) -> None:
    try:
        torch.cuda.set_device(torch.device(device))
        client = WeightClient(_Net().to(device))
        client.connect(spec)
        handle, version = inbox.get(timeout=120)
        client.receive(handle, version)
        assert client.apply_pending() == version
        outbox.put({n: p.cpu() for n, p in client.target.module.named_parameters()})
        client.close()
    except BaseException as exc:  # surfaced by the test
        outbox.put(repr(exc))


def _values(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randn(64, 33, generator=g).to(device),
        torch.randn(5, generator=g).bfloat16().to(device),
    ]


def _run(method: str, backend: str, sender_device: str, receiver_device: str) -> None:
    mp = torch.multiprocessing.get_context("spawn")
    manifest = _manifest()
    port = free_port()
    specs = [
        TransportSpec(manifest, method, r, 2, "127.0.0.1", port, backend, 120.0, d)
        for r, d in ((0, sender_device), (1, receiver_device))
    ]
    inbox, outbox = mp.Queue(), mp.Queue()
    proc = mp.Process(target=_receiver, args=(specs[1], receiver_device, inbox, outbox))
    proc.start()
    try:
        impl = get_broadcast(method)
        sender = impl.sender()
        sender.open(specs[0])
        values = _values(sender_device)
        if impl.sender.streams:
            inbox.put((None, 4))
            stats, _ = sender.push(iter_buckets(manifest, values), 4)
        else:
            stats, handle = sender.push(iter_buckets(manifest, values), 4)
            inbox.put((handle, 4))
        got = outbox.get(timeout=180)
        assert not isinstance(got, str), got
        assert stats.bytes == manifest.nbytes
        for (name, _), want in zip(_Net().named_parameters(), values, strict=True):
            assert torch.equal(got[name], want.cpu()), name
        sender.close()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_moves_weights_to_a_process_on_the_same_gpu() -> None:
    _run("cuda_ipc", "nccl", "cuda:0", "cuda:0")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_torch_dist_over_nccl_moves_weights_between_two_gpus() -> None:
    _run("torch_dist", "nccl", "cuda:0", "cuda:1")
