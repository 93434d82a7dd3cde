"""Shared by the actor tests: one weight broadcast over a real two-rank gloo group."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from embr_rl.core.transport import (
    Manifest,
    TorchDistBroadcast,
    TransportSpec,
    free_port,
    iter_buckets,
)


def broadcast_over_gloo(
    manifest: Manifest,
    tensors: Sequence[torch.Tensor],
    version: int,
    connect: Callable[[TransportSpec], None],
    receive: Callable[[Any, int], int],
) -> int:
    """Learner rank 0 in a thread, the receiver here, over a real gloo group (no Ray)."""
    port = free_port()
    specs = [
        TransportSpec(manifest, "torch_dist", r, 2, "127.0.0.1", port, "gloo", 30.0)
        for r in range(2)
    ]
    sender = TorchDistBroadcast()
    outcome: list[BaseException | None] = []

    def learner() -> None:
        try:
            sender.open(specs[0])
            sender.push(iter_buckets(manifest, tensors), version)
            outcome.append(None)
        except BaseException as exc:  # surfaced below
            outcome.append(exc)

    thread = threading.Thread(target=learner, daemon=True)
    thread.start()
    connect(specs[1])
    nbytes = receive(None, version)
    thread.join(60)
    sender.close()
    assert outcome == [None], outcome
    return nbytes
