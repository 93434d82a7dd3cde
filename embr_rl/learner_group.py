"""K learner ranks as Ray actors in one placement group, and their weight push to workers.

Thin Ray plumbing around :class:`~learner.learner.Learner`: resources and placement come
from ``learner.*`` (``num_ranks``, ``num_cpus_per_rank``, ``num_gpus_per_rank``,
``placement_strategy``). Rank 0 picks the rendezvous address; every rank sets up
``torch.distributed`` explicitly (gloo on CPU, NCCL on GPU) before DeepSpeed starts.

A rollout worker taking part in weight sync exposes two methods, usually delegating to a
:class:`~embr_rl.core.transport.WeightClient`: ``connect_weights(spec: TransportSpec)`` and
``receive_weights(handle, version: int)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from embr_rl.core.config import Config
from embr_rl.core.experience import PairBatch
from embr_rl.core.transport import TransportSpec, get_broadcast
from learner.batching import batch_stats, shard

__all__ = ["LearnerGroup", "LearnerRank", "mean_metrics"]

ModelFactory = Callable[[], Any]  # () -> learner.learner.PolicySpec


class _RemoteBuffer:
    """A buffer actor handle seen as a local buffer (``sample`` / ``sample_pairs``)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def sample(self, n: int, *, generator: int) -> pa.Table:
        import ray

        return ray.get(self.handle.sample.remote(n, generator=generator))

    def sample_pairs(self, n: int, *, generator: int) -> PairBatch:
        import ray

        return ray.get(self.handle.sample_pairs.remote(n, generator=generator))


class LearnerRank:
    """The body of one rank's actor: sets up the process group, then owns a ``Learner``."""

    def __init__(
        self, cfg: Config, rank: int, world_size: int, factory: ModelFactory | None = None
    ):
        self.cfg, self.rank, self.world_size, self.factory = cfg, rank, world_size, factory
        self.learner: Any = None
        import torch

        threads = cfg.learner.num_threads or max(1, round(cfg.learner.num_cpus_per_rank))
        torch.set_num_threads(threads)

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port (asked of rank 0 for the rendezvous)."""
        import ray

        from learner.learner import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, host: str, port: int) -> int:
        """Join the learners' process group and build the engine; returns this rank."""
        import torch

        from embr_rl.core.runtime import quiet_libraries
        from learner.learner import Learner, PolicySpec, init_distributed

        quiet_libraries()

        if torch.cuda.is_available():
            os.environ["LOCAL_RANK"] = "0"  # Ray exposes one device per rank
        init_distributed(
            self.rank, self.world_size, host=host, port=port, backend=self.cfg.learner.dist_backend
        )
        if self.factory is None:
            self.learner = Learner.from_config(self.cfg)
        else:
            spec: PolicySpec = self.factory()
            self.learner = Learner(
                self.cfg.learner, self.cfg.algo, spec, lora=self.cfg.model.lora, seed=self.cfg.seed
            )
        return self.rank

    def train_step(self, batch: pa.Table | PairBatch) -> dict[str, float]:
        return self.learner.train_step(batch)

    def train_from_buffer(self, buffer: Any, version: int | None = None) -> dict[str, float]:
        """Draw this rank's shard from a buffer actor handle (seeded by step and rank), then step.

        With ``version`` (the learner's policy version) the batch's staleness is reported too.
        """
        start = time.perf_counter()
        batch = self.learner.sample_from(_RemoteBuffer(buffer))
        drawn = time.perf_counter()
        metrics = self.learner.train_step(batch)
        metrics["time/learner_draw_s"] = drawn - start
        metrics["time/learner_compute_s"] = time.perf_counter() - drawn
        if version is not None:
            metrics.update(batch_stats(batch, version))
        return metrics

    def step(self) -> int:
        return int(self.learner.step)

    def manifest(self) -> Any:
        return self.learner.manifest()

    def open_sync(self, spec: TransportSpec) -> None:
        self.learner.open_sync(spec)

    def push_weights(self, version: int) -> tuple[Any, list[Any]]:
        stats, handle = self.learner.push_weights(version)
        return stats, [handle]  # a list, so Ray hands the ObjectRef back instead of resolving it

    def full_state(self) -> dict[str, Any]:
        return self.learner.full_state()

    def save(self, path: str) -> str:
        return str(self.learner.save(path))

    def load(self, path: str) -> int:
        return self.learner.load(path)

    def close(self) -> None:
        from learner.learner import shutdown_distributed

        if self.learner is not None:
            self.learner.close()
        shutdown_distributed()


def mean_metrics(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average each metric over the ranks that reported it."""
    keys = {k for m in per_rank for k in m}
    return {
        k: sum(m[k] for m in per_rank if k in m) / sum(k in m for m in per_rank)
        for k in sorted(keys)
    }


class LearnerGroup:
    """``learner.num_ranks`` :class:`LearnerRank` actors packed by one placement group."""

    def __init__(self, cfg: Config, factory: ModelFactory | None = None) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lc = cfg.learner
        bundle = {
            k: v for k, v in (("CPU", lc.num_cpus_per_rank), ("GPU", lc.num_gpus_per_rank)) if v > 0
        }
        if not bundle:
            raise ValueError(
                "learner.num_cpus_per_rank and learner.num_gpus_per_rank are both 0; "
                "allowed: at least one > 0 (a placement-group bundle cannot be empty)"
            )
        self.cfg = cfg
        self.world_size = lc.num_ranks
        self.pg = placement_group([bundle] * lc.num_ranks, strategy=lc.placement_strategy)
        ray.get(self.pg.ready(), timeout=lc.sync_timeout_s)
        actor = ray.remote(LearnerRank)
        self.ranks = [
            actor.options(
                num_cpus=lc.num_cpus_per_rank,
                num_gpus=lc.num_gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i
                ),
            ).remote(cfg, i, lc.num_ranks, factory)
            for i in range(lc.num_ranks)
        ]
        host, port = ray.get(self.ranks[0].address.remote())
        ray.get([r.setup.remote(host, port) for r in self.ranks])
        self._broadcast = get_broadcast(lc.broadcast)
        self._workers: list[Any] = []
        self.failed: list[tuple[Any, Exception]] = []
        self.version = 0

    def train_step_async(self, buffer: Any, version: int | None = None) -> list[Any]:
        """Start one step on shards drawn from ``buffer`` on every rank; returns the Ray refs
        (finish with :func:`mean_metrics` over ``ray.get(refs)``)."""
        return [r.train_from_buffer.remote(buffer, version) for r in self.ranks]

    def train_step(
        self, batch: pa.Table | PairBatch | None = None, buffer: Any = None
    ) -> dict[str, float]:
        """One step on a given global batch (sharded over ranks) or on shards drawn from ``buffer``."""
        import ray

        if (batch is None) == (buffer is None):
            raise ValueError(
                "give exactly one of batch (a global batch) or buffer (a buffer actor)"
            )
        if batch is not None:
            refs = [
                r.train_step.remote(shard(batch, i, self.world_size))
                for i, r in enumerate(self.ranks)
            ]
        else:
            refs = [r.train_from_buffer.remote(buffer) for r in self.ranks]
        return mean_metrics(ray.get(refs))

    def connect_workers(
        self, workers: Sequence[Any], *, device: str = "cpu", method: str | None = None
    ) -> None:
        """Open weight sync between rank 0 and ``workers`` (ranks 1..N).

        ``method`` defaults to ``learner.broadcast``; it is fixed until the next connect.
        """
        import ray

        lc = self.cfg.learner
        method = lc.broadcast if method is None else method
        self._broadcast = get_broadcast(method)
        manifest = ray.get(self.ranks[0].manifest.remote())
        host, port = ray.get(self.ranks[0].address.remote())
        backend = lc.sync_backend
        if backend == "auto":
            backend = "nccl" if device.startswith("cuda") else "gloo"
        world = len(workers) + 1

        def spec(rank: int) -> TransportSpec:
            return TransportSpec(
                manifest, method, rank, world, host, port, backend, lc.sync_timeout_s, device
            )

        ray.get(
            [self.ranks[0].open_sync.remote(spec(0))]
            + [w.connect_weights.remote(spec(i + 1)) for i, w in enumerate(workers)]
        )
        self._workers = list(workers)

    def broadcast(self, version: int | None = None) -> dict[str, float]:
        """Push the current weights to the connected workers; ``sync/...`` metrics.

        A receiver whose actor died does not fail the broadcast: it is listed with its error
        in ``self.failed`` (the object-store method; a dead peer in a ``torch_dist`` group
        stalls the collective until ``learner.sync_timeout_s``).
        """
        import ray

        if not self._workers:
            raise RuntimeError("broadcast before connect_workers: no rollout worker is connected")
        self.version = self.version + 1 if version is None else version
        start = time.perf_counter()
        pushes = [r.push_weights.remote(self.version) for r in self.ranks]
        if self._broadcast.sender.streams:
            receives = [w.receive_weights.remote(None, self.version) for w in self._workers]
            stats, _ = ray.get(pushes)[0]
        else:
            stats, (handle,) = ray.get(pushes)[0]
            receives = [w.receive_weights.remote(handle, self.version) for w in self._workers]
        self.failed = []
        for w, ref in zip(self._workers, receives, strict=True):
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # a dead receiver; the driver decides
                self.failed.append((w, exc))
        metrics = stats.metrics()
        metrics["sync/wall_seconds"] = time.perf_counter() - start
        metrics["sync/failed_receivers"] = float(len(self.failed))
        return metrics

    def full_state(self) -> dict[str, Any]:
        """Gathered policy parameters (from rank 0)."""
        import ray

        return ray.get([r.full_state.remote() for r in self.ranks])[0]

    def save(self, path: str) -> str:
        import ray

        return ray.get([r.save.remote(path) for r in self.ranks])[0]

    def load(self, path: str) -> int:
        import ray

        return ray.get([r.load.remote(path) for r in self.ranks])[0]

    def shutdown(self) -> None:
        """Close every rank, then free the actors and the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([r.close.remote() for r in self.ranks], timeout=60)
        finally:
            for r in self.ranks:
                ray.kill(r)
            remove_placement_group(self.pg)
