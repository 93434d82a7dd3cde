"""Pre-training pieces: the masked-diffusion loss and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from embr_rl.pretrain import _lr_at, masked_diffusion_loss


def test_masked_diffusion_loss_hand_value() -> None:
    # vocabulary 2, logits 0 everywhere: every token has log-probability log(1/2)
    logits = torch.zeros(2, 4, 2)
    targets = torch.zeros(2, 4, dtype=torch.long)
    masked = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    weights = torch.tensor([2.0, 4.0])  # count weights L/l for l = 2 and l = 1
    expected = (2 * math.log(2) * 2.0 / 4 + 1 * math.log(2) * 4.0 / 4) / 2
    assert abs(masked_diffusion_loss(logits, targets, masked, weights).item() - expected) < 1e-6


def test_unmasked_positions_do_not_count() -> None:
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[1, 2, 3]])
    masked = torch.tensor([[0.0, 1.0, 0.0]])
    other = logits.clone()
    other[0, 0] = 100.0  # change an unmasked position only
    w = torch.ones(1)
    assert torch.equal(
        masked_diffusion_loss(logits, targets, masked, w),
        masked_diffusion_loss(other, targets, masked, w),
    )


def test_lr_warmup_then_cosine_to_zero() -> None:
    assert _lr_at(0, 100, 1.0, 10) == 0.1
    assert _lr_at(9, 100, 1.0, 10) == 1.0
    assert abs(_lr_at(10, 100, 1.0, 10) - 1.0) < 1e-12
    assert _lr_at(100, 100, 1.0, 10) < 1e-12
    assert all(_lr_at(s, 100, 1.0, 10) >= _lr_at(s + 1, 100, 1.0, 10) for s in range(10, 100))


def test_corrupt_answer_boxes_the_result_plus_one() -> None:
    from embr_rl.pretrain import corrupt_answer

    assert corrupt_answer("12+7=19;19-5=14;\\boxed{14}", "14") == "12+7=19;19-5=14;\\boxed{15}"


@pytest.mark.slow
def test_pretraining_is_a_function_of_config_and_seed(tmp_path) -> None:
    """Fixed steps and seeded draws (no clock budget): two runs give identical weights."""
    from safetensors.torch import load_file

    from embr_rl.core.config import load_config
    from embr_rl.pretrain import pretrain

    small = [
        "pretrain.max_steps=6",
        "pretrain.batch_size=8",
        "pretrain.wrong_answer_share=0.5",
        "model.builtin.hidden_size=32",
        "model.builtin.num_layers=1",
        "model.builtin.num_heads=2",
        "model.builtin.intermediate_size=64",
        "task.arith.num_test=4",
    ]
    weights = []
    for run in ("a", "b"):
        cfg = load_config("configs/demo_base.yaml", [*small, f"logging.run_dir={tmp_path / run}"])
        out = pretrain(cfg)
        weights.append(load_file(str(out / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_shipped_base_model_is_what_demo_base_yaml_builds() -> None:
    """The shipped model's record names the settings configs/demo_base.yaml rebuilds it with."""
    import json

    from embr_rl.core.config import load_config
    from embr_rl.pretrain import WRONG_ANSWER_BASE_MODEL

    cfg = load_config("configs/demo_base.yaml")
    record = json.loads((WRONG_ANSWER_BASE_MODEL / "pretrain_summary.json").read_text())
    built = (record["steps"], record["seed"], record["wrong_answer_share"])
    assert built == (cfg.pretrain.max_steps, cfg.seed, cfg.pretrain.wrong_answer_share)
    assert load_config("configs/demo.yaml").model.path.endswith(WRONG_ANSWER_BASE_MODEL.name)
