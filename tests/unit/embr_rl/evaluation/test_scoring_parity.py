"""Rollouts and evaluation score a completion alike: a HumanEval rollout row's reward is the
evaluator's correctness of the same completion (issue 17)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.engines import DecodeOptions, EngineOutput
from actors.rollout import RolloutWorker
from actors.verifiers.code import IsolationWarning
from embr_rl.core.config import EvalConfig, TaskConfig, VerifierConfig
from embr_rl.core.models.loader import LoadedModel
from embr_rl.core.tasks import Problem, load_task
from embr_rl.evaluation import evaluate as evaluate_module
from embr_rl.evaluation.cli import evaluate_shard
from embr_rl.evaluation.evaluate import evaluate

EOS, PAD = 1, 0
# HumanEval/0 needs the prompt's ``from typing import List``; HumanEval/10 its helper.
IDS = ("HumanEval/0", "HumanEval/10")


class _TextTok:
    """One token per character (id = code point + 2), so decoding gives the text back."""

    eos_token_id = EOS
    pad_token_id = PAD
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) + 2 for c in text]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 2) for i in ids if i > EOS)


def _ids(texts: Sequence[str]) -> torch.Tensor:
    rows = [[ord(c) + 2 for c in t] for t in texts]
    width = max(len(r) for r in rows) + 1
    return torch.tensor([r + [EOS] * (width - len(r)) for r in rows])


class _FixedEngine:
    """Answers the i-th prompt with the i-th of ``texts`` whatever the options."""

    name = "fixed"

    def __init__(self, texts: Sequence[str], *args: Any, **kwargs: Any) -> None:
        self.texts = list(texts)

    def generate(
        self, prompts: Sequence[Sequence[int]], options: DecodeOptions, *, seed: int | None = None
    ) -> EngineOutput:
        assert len(prompts) == len(self.texts)
        return EngineOutput(_ids(self.texts))

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        pass


@pytest.fixture(scope="module")
def problems(shared_data: Path) -> list[Problem]:
    by_id = {
        p.id: p for p in load_task(TaskConfig(name="humaneval", data_dir=str(shared_data)), "test")
    }
    return [by_id[i] for i in IDS]


@pytest.fixture(scope="module")
def verifier_cfg() -> VerifierConfig:
    return VerifierConfig()


def _bodies(problems: Sequence[Problem], right: bool) -> list[str]:
    """The canonical body (the solution after the prompt) or a wrong one, without the prompt."""
    if not right:
        return ["    return None\n" for _ in problems]
    return [(p.solution or "")[len(p.question) :] for p in problems]


def _rollout_rewards(
    problems: Sequence[Problem], texts: Sequence[str], cfg: VerifierConfig
) -> tuple[list[float], list[str]]:
    worker = RolloutWorker(
        _FixedEngine(texts),
        _TextTok(),
        DecodeOptions(),
        group_size=1,
        verifier_cfg=cfg,
        num_scorers=2,
    )
    try:
        rows = worker.generate(problems).to_pylist()
    finally:
        worker.close()
    assert [r["prompt_id"] for r in rows] == [p.id for p in problems]
    return [r["reward"] for r in rows], [r["verifier_status"] for r in rows]


@pytest.mark.parametrize("right", [True, False], ids=["canonical", "wrong"])
def test_a_humaneval_rollout_reward_is_the_evaluators_score(
    problems: list[Problem],
    verifier_cfg: VerifierConfig,
    monkeypatch: pytest.MonkeyPatch,
    right: bool,
) -> None:
    texts = _bodies(problems, right)
    want = 1.0 if right else 0.0
    loaded = LoadedModel(
        torch.nn.Identity(), _TextTok(), 2, EOS, PAD, None, torch.device("cpu"), torch.float32
    )
    eval_cfg = EvalConfig(batch_size=len(problems), gen_length=8, block_length=8, steps=8)
    monkeypatch.setattr(evaluate_module, "TorchEngine", lambda *a, **k: _FixedEngine(texts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        rewards, statuses = _rollout_rewards(problems, texts, verifier_cfg)
        evaluated = evaluate(loaded, problems, eval_cfg)
        records = evaluate_shard(
            loaded,
            problems,
            length=8,
            eval_cfg=eval_cfg,
            prompt_format="d1",
            chat_template=False,
            verifier_cfg=verifier_cfg,
            seed=0,
        )
    assert [s["completion"] for s in evaluated.samples] == texts
    assert rewards == [want, want]
    assert [s["reward"] for s in evaluated.samples] == rewards
    assert [float(r["correct"]) for r in records] == rewards
    assert statuses == [r["outcome"] for r in records]
    assert set(statuses) == ({"passed"} if right else {"failed"})
