"""A learner step with bf16 and ZeRO-2 on one GPU (skipped without CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from embr_rl.core.config import AlgoConfig, LearnerConfig
from embr_rl.core.models import EmbrDiffusionConfig, EmbrDiffusionModel

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def _rows():
    from embr_rl.core.experience import rows_from_dicts

    g = torch.Generator().manual_seed(0)
    return rows_from_dicts(
        [
            {
                "sample_id": str(i),
                "prompt_id": f"p{i // 4}",
                "prompt_ids": torch.randint(2, 30, (5,), generator=g).tolist(),
                "completion_ids": torch.randint(1, 30, (8,), generator=g).tolist(),
                "reward": float(i % 2),
                "policy_version": 0,
                "task": "toy",
            }
            for i in range(8)
        ]
    )


def test_bf16_zero2_step_on_one_gpu() -> None:
    from learner.learner import Learner, PolicySpec, init_distributed, shutdown_distributed

    torch.manual_seed(0)
    cfg = EmbrDiffusionConfig(
        vocab_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        mask_token_id=31,
        pad_token_id=0,
        eos_token_id=1,
    )
    init_distributed(backend="nccl")
    try:
        learner = Learner(
            LearnerConfig(
                zero_stage=2, precision="auto", batch_size=8, micro_batch_size=4, lr=1e-3
            ),
            AlgoConfig(name="embr_c", num_mc_samples=2),
            PolicySpec(EmbrDiffusionModel(cfg), 31, 0, 1),
        )
        assert learner.bf16 and learner.device.type == "cuda"
        before = {n: p.detach().float().clone() for n, p in learner.policy.named_parameters()}
        assert all(p.dtype == torch.bfloat16 for p in learner.policy.parameters())
        metrics = learner.train_step(_rows())
        assert math.isfinite(metrics["learner/loss"]) and math.isfinite(
            metrics["learner/grad_norm"]
        )
        moved = [
            not torch.equal(p.detach().float(), before[n])
            for n, p in learner.policy.named_parameters()
        ]
        assert any(moved)
        state = learner.full_state()
        assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in state.values())
        learner.close()
    finally:
        shutdown_distributed()
