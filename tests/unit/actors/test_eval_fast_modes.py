"""``eval.threshold`` / ``eval.cache`` / ``eval.stop_at_eos`` reach the decoder."""

from __future__ import annotations

import torch

from embr_rl.core.config import BuiltinModelConfig, EvalConfig, TaskConfig
from embr_rl.core.models.loader import LoadedModel, build_builtin_model
from embr_rl.core.models.tokenizer import train_char_tokenizer
from embr_rl.core.tasks import load_task
from embr_rl.evaluation.evaluate import evaluate


def test_eval_config_fast_modes_change_the_decoding_cost() -> None:
    problems = load_task(TaskConfig(name="arith", limit=4), "test")
    tok = train_char_tokenizer(["0123456789+-=;\\boxed{}"] + [p.question for p in problems])
    torch.manual_seed(0)
    loaded = LoadedModel(
        build_builtin_model(
            BuiltinModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok
        ).eval(),
        tok,
        tok.mask_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
        None,
        torch.device("cpu"),
        torch.float32,
    )
    base = dict(batch_size=4, gen_length=8, block_length=4, steps=4)
    exact = evaluate(loaded, problems, EvalConfig(**base))
    fast = evaluate(loaded, problems, EvalConfig(**base, threshold=1e-6, cache="dual"))
    assert exact.stats.forward_passes == 4 and fast.stats.forward_passes == 2
    assert fast.stats.positions_computed < exact.stats.positions_computed
    assert fast.num == exact.num == 4
