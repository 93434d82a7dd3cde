"""Shared by the learner integration tests: a tiny policy and deterministic buffer rows."""

from __future__ import annotations

import torch

from embr_rl.core.experience import rows_from_dicts
from learner.learner import PolicySpec
from tests.conftest import build_tiny_model

VOCAB, MASK_ID, PAD_ID, EOS_ID = 32, 31, 0, 1


def tiny_policy(seed: int = 0) -> PolicySpec:
    """The conftest ``tiny_model`` architecture (2 layers, 64 dims, vocab 32, mask 31)."""
    return PolicySpec(build_tiny_model(seed).train(), MASK_ID, PAD_ID, EOS_ID)


def rows(step: int, n: int = 8, group: int = 4):
    """``n`` scored completions, ``group`` per prompt, prompts of uneven length; fixed by ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for i in range(n):
        out.append(
            {
                "sample_id": f"{step}-{i}",
                "prompt_id": f"{step}-p{i // group}",
                "prompt_ids": torch.randint(2, 30, (3 + (i // group) % 2,), generator=g).tolist(),
                "completion_ids": torch.randint(1, 30, (6,), generator=g).tolist(),
                "reward": float((i * 7 + step) % 3),
                "policy_version": 0,
                "task": "toy",
            }
        )
    return rows_from_dicts(out)
