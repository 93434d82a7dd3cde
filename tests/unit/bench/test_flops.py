"""bench/flops.py: what it counts (the FLOP figures are printed, never asserted)."""

from __future__ import annotations

import argparse

import torch

from bench import flops
from bench.decode import llada_shaped


def _tiny() -> torch.nn.Module:
    return llada_shaped(
        argparse.Namespace(random_width=128, random_layers=1, random_vocab=64, head_scale=1.0)
    )


def test_matmul_parameters_leave_out_the_input_embedding() -> None:
    model = _tiny()
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert flops.matmul_params(model) == total - emb


def test_the_learner_step_updates_every_weight() -> None:
    torch.manual_seed(0)
    model = _tiny().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flops.learner_step(model, batch=2, length=flops.PROMPT + 8, mask_id=63, vocab=64)()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_matmul_flops_is_positive_and_finite() -> None:
    rate = flops.matmul_flops(32, 32, 32, repeats=1)
    assert 0 < rate < float("inf")
