"""Weight broadcast: seconds per update and effective GB/s of each CPU transport against memcpy.

For 10M and 100M fp32 parameters (tensors of 1M elements, like a model's layers) and 1, 2
and 4 receivers (Ray actors holding a :class:`embr_rl.core.transport.WeightClient`), the driver
plays learner rank 0 and pushes one update; the time runs from the start of the push until
every receiver has staged and applied it (after two warm-up updates). Next to it: a raw
``memcpy`` of the same bytes (one copy per receiver) on this machine, the physical limit of
any local transfer.

    RAY_AUTH_MODE=disabled python -m bench.sync [--sizes 10 100] [--receivers 1 2 4] [--methods ...]

``GB/s`` is model bytes over seconds per update; ``x memcpy`` is seconds per update over
the seconds of ``receivers`` plain copies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

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

CHUNK = 1_000_000


class _Flat(nn.Module):
    def __init__(self, num_params: int) -> None:
        super().__init__()
        for i in range(num_params // CHUNK):
            self.register_parameter(f"p{i}", nn.Parameter(torch.zeros(CHUNK), requires_grad=False))


class Receiver:
    """A stand-in rollout worker: the model and the weight-sync client."""

    def __init__(self, num_params: int) -> None:
        torch.set_num_threads(1)
        self.client = WeightClient(_Flat(num_params))

    def connect_weights(self, spec: TransportSpec) -> None:
        self.client.connect(spec)

    def receive_weights(self, handle: Any, version: int) -> int | None:
        self.client.receive(handle, version)
        return self.client.apply_pending()

    def close(self) -> None:
        self.client.close()


def memcpy_seconds(num_bytes: int, copies: int, reps: int) -> float:
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = [torch.empty_like(src) for _ in range(copies)]
    for d in dst:  # fault the pages in first
        d.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for d in dst:
            d.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_method(
    ray: Any, method: str, num_params: int, receivers: int, bucket_mb: float, reps: int
) -> float:
    model = _Flat(num_params)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    params = [p for _, p in model.named_parameters()]
    manifest = build_manifest(
        [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()], bucket_mb
    )
    actors = [ray.remote(num_cpus=0)(Receiver).remote(num_params) for _ in range(receivers)]
    impl = get_broadcast(method)
    port = free_port()
    world = receivers + 1
    sender = impl.sender()
    specs = [
        TransportSpec(manifest, method, r, world, "127.0.0.1", port, "gloo", 300.0)
        for r in range(world)
    ]
    pending = [a.connect_weights.remote(specs[i + 1]) for i, a in enumerate(actors)]
    sender.open(specs[0])
    ray.get(pending)
    times = []
    try:
        # Two warm-up updates: shared_memory maps its second slot on the second one.
        for version in range(reps + 2):
            start = time.perf_counter()
            if impl.sender.streams:
                refs = [a.receive_weights.remote(None, version) for a in actors]
                sender.push(iter_buckets(manifest, params), version)
            else:
                _, handle = sender.push(iter_buckets(manifest, params), version)
                refs = [a.receive_weights.remote(handle, version) for a in actors]
            assert ray.get(refs) == [version] * receivers
            if version >= 2:
                times.append(time.perf_counter() - start)
    finally:
        sender.close()
        ray.get([a.close.remote() for a in actors])
        for a in actors:
            ray.kill(a)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10, 100], help="millions of parameters"
    )
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["shared_memory", "object_store", "torch_dist"],
        help="learner.broadcast values to measure (cuda_ipc needs a GPU)",
    )
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(1)
    print(
        f"host: {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}, bucket {args.bucket_mb} MiB"
    )
    header = f"{'params':>7} {'recv':>4} {'method':>12} {'s/update':>9} {'GB/s':>7} {'x memcpy':>9}"
    print(header)
    print("-" * len(header))
    try:
        for size in args.sizes:
            num_params = size * 1_000_000
            nbytes = num_params * 4
            for receivers in args.receivers:
                base = memcpy_seconds(nbytes, receivers, args.reps)
                print(
                    f"{size:>6}M {receivers:>4} {'memcpy':>12} {base:>9.4f} {nbytes / base / 1e9:>7.2f} {1.0:>9.1f}"
                )
                for method in args.methods:
                    sec = run_method(ray, method, num_params, receivers, args.bucket_mb, args.reps)
                    print(
                        f"{size:>6}M {receivers:>4} {method:>12} {sec:>9.4f} {nbytes / sec / 1e9:>7.2f} "
                        f"{sec / base:>9.1f}",
                        flush=True,
                    )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
