"""Evaluation scoring and the decode-and-score loop."""

from __future__ import annotations

import torch

from embr_rl.core.config import EvalConfig
from embr_rl.core.models.loader import LoadedModel
from embr_rl.core.tasks import Problem
from embr_rl.evaluation.evaluate import correctness_scorer, evaluate
from tests.conftest import TINY_MASK_ID


def _problem(answer: str, verifier: str = "math") -> Problem:
    return Problem(id="p", task="arith", question="12+7=", answer=answer, verifier=verifier)


def test_correctness_scorer_uses_the_math_verifier() -> None:
    score = correctness_scorer()
    assert score("12+7=19;\\boxed{19}", _problem("19")) == 1.0
    assert score("12+7=19;\\boxed{18}", _problem("19")) == 0.0
    assert score("no answer here", _problem("19")) == 0.0
    assert score("\\boxed{19.0}", _problem("19")) == 1.0  # equivalence, not string match


class _CharTok:
    """Maps each character to an id in 2..29 (never the mask 31); decodes ids back to letters."""

    pad_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + (ord(c) % 28) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_evaluate_decodes_scores_and_groups(tiny_model) -> None:
    problems = [
        Problem(id=str(i), task="arith", question=q, answer="1", metadata={"n": n})
        for i, (q, n) in enumerate([("1+0=", 2), ("10+0=", 2), ("1+0+0=", 3)])
    ]
    loaded = LoadedModel(
        tiny_model, _CharTok(), TINY_MASK_ID, 1, 0, None, torch.device("cpu"), torch.float32
    )
    calls: list[str] = []

    def scorer(completion: str, problem: Problem) -> float:
        calls.append(problem.id)
        return 1.0 if problem.id == "0" else 0.0

    res = evaluate(
        loaded,
        problems,
        EvalConfig(batch_size=2, gen_length=8, block_length=4, steps=4),
        scorer=scorer,
        group_key="n",
    )
    assert calls == ["0", "1", "2"] and res.num == 3
    assert abs(res.accuracy - 1 / 3) < 1e-12
    assert res.by_group == {"2": 0.5, "3": 0.0}
    assert res.stats.forward_passes == 8  # two batches x 4 steps
    assert all(len(s["completion"]) <= 8 for s in res.samples)
    # Continuous batching over the same 2 slots: the same greedy completions and scores.
    flowing = evaluate(
        loaded,
        problems,
        EvalConfig(batch_size=2, gen_length=8, block_length=4, steps=4, continuous_batching=True),
        scorer=scorer,
        group_key="n",
    )
    assert [s["completion"] for s in flowing.samples] == [s["completion"] for s in res.samples]
    assert flowing.accuracy == res.accuracy and flowing.stats.tokens_committed == 3 * 8


def test_evaluate_stops_and_cuts_at_end_of_turn_ids(tiny_model) -> None:
    # The model is sure of 4 everywhere: 4 stands for an end-of-turn id (<|eot_id|>).
    bias = torch.zeros(tiny_model.config.vocab_size)
    bias[4] = 50.0
    with torch.no_grad():
        tiny_model.lm_head.bias = torch.nn.Parameter(bias)
    problems = [Problem(id="0", task="arith", question="1+0=", answer="1")]
    cfg = EvalConfig(batch_size=1, gen_length=8, block_length=4, steps=4, stop_at_eos=True)
    args = (tiny_model, _CharTok(), TINY_MASK_ID, 1, 0, None, torch.device("cpu"), torch.float32)
    plain = evaluate(LoadedModel(*args), problems, cfg, scorer=lambda c, p: 0.0)
    assert plain.samples[0]["completion"] == "e" * 8 and plain.stats.forward_passes == 4
    turn = evaluate(LoadedModel(*args, (1, 4)), problems, cfg, scorer=lambda c, p: 0.0)
    assert turn.samples[0]["completion"] == "" and turn.stats.forward_passes == 2
