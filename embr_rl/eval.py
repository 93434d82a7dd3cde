"""Evaluation: decode test prompts and score the completions.

:func:`evaluate` decodes a list of problems with confidence-based decoding (temperature 0
by default) and reports accuracy overall and by a metadata key, with sample generations.
A sample counts as correct when its problem's verifier (``actors.verifiers``) says so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.decoding import DecodeStats
from actors.engines import DecodeOptions
from actors.engines.torch_engine import TorchEngine
from actors.verifiers import Verifier, build_verifier
from embr_rl.config import EvalConfig, VerifierConfig
from embr_rl.models.loader import LoadedModel
from embr_rl.models.tokenizer import decode_completions
from embr_rl.tasks import Problem
from embr_rl.tasks.prompts import encode_problems

Scorer = Callable[[str, Problem], float]


def correctness_scorer(cfg: VerifierConfig | None = None) -> Scorer:
    """1.0 when the problem's verifier judges the completion correct, else 0.0 (format terms of
    the reward presets do not count towards accuracy)."""
    verifiers: dict[str, Verifier] = {}

    def score(completion: str, problem: Problem) -> float:
        if problem.verifier not in verifiers:
            verifiers[problem.verifier] = build_verifier(problem.verifier, cfg)
        return float(verifiers[problem.verifier].score(completion, problem).outcome == "correct")

    return score


@dataclass
class EvalResult:
    """Accuracy overall and by group, with per-sample records."""

    accuracy: float
    num: int
    by_group: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)


def evaluate(
    loaded: LoadedModel,
    problems: Sequence[Problem],
    cfg: EvalConfig,
    *,
    prompt_format: str = "plain",
    chat_template: bool = False,
    scorer: Scorer | None = None,
    group_key: str | None = None,
    seed: int = 0,
) -> EvalResult:
    """Decode every problem once with the built-in engine and score it; ``group_key`` splits
    accuracy by a metadata field."""
    tok = loaded.tokenizer
    scorer = scorer or correctness_scorer()
    engine = TorchEngine(
        loaded.model,
        loaded.mask_token_id,
        eos_id=loaded.eos_token_id,
        pad_id=loaded.pad_token_id,
        max_batch_size=cfg.batch_size,
    )
    texts, prompts = encode_problems(problems, tok, prompt_format, chat_template)
    out = engine.generate(prompts, DecodeOptions.from_config(cfg), seed=seed)
    completions = decode_completions(tok, out.completion_ids, loaded.eos_token_id)
    samples: list[dict[str, Any]] = [
        {
            "id": p.id,
            "prompt": text,
            "completion": completion,
            "answer": p.answer,
            "reward": scorer(completion, p),
            "group": None if group_key is None else str(p.metadata.get(group_key)),
        }
        for p, text, completion in zip(problems, texts, completions, strict=True)
    ]
    groups: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if s["group"] is not None:
            groups[s["group"]].append(s["reward"])
    n = len(samples)
    return EvalResult(
        accuracy=sum(s["reward"] for s in samples) / n if n else 0.0,
        num=n,
        by_group={k: sum(v) / len(v) for k, v in sorted(groups.items())},
        samples=samples,
        stats=out.stats,
    )
