"""Evaluation: decode test prompts and score the completions.

:func:`evaluate` decodes a list of problems with confidence-based decoding (temperature 0
by default) and reports accuracy overall and by a metadata key, with sample generations.
A sample counts as correct when its problem's verifier (``actors.verifiers``) says so.

The command line ``python -m embr_rl.eval MODEL --task ... --lengths ...`` (d1 protocol,
tables of accuracy by task and length; docs/evaluation.md) is :mod:`embr_rl.evaluation.cli`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.decoding import DecodeStats
from actors.engines import DecodeOptions
from actors.engines.torch_engine import TorchEngine
from actors.verifiers import Score
from actors.verifiers.pool import ProblemScorer
from embr_rl.core.config import EvalConfig, VerifierConfig
from embr_rl.core.models.loader import LoadedModel
from embr_rl.core.models.tokenizer import decode_completions
from embr_rl.core.tasks import Problem
from embr_rl.core.tasks.prompts import encode_problems

Scorer = Callable[[str, Problem], float]
# Called with the number of problems just decoded and scored.
ProgressFn = Callable[[int], None]


# Verifier outcomes that count as a solved problem: the math verifier says "correct", the
# code verifier "passed" (every test ran and held).
CORRECT_OUTCOMES = frozenset({"correct", "passed"})


def is_correct(score: Score) -> bool:
    """Whether a verifier's score marks the problem solved (format terms do not count)."""
    return score.outcome in CORRECT_OUTCOMES


def correctness_scorer(cfg: VerifierConfig | None = None) -> Scorer:
    """1.0 when the problem's verifier judges the completion correct, else 0.0 (format terms of
    the reward presets do not count towards accuracy). Scores like the rollouts do
    (:class:`actors.verifiers.pool.ProblemScorer`)."""
    scorer = ProblemScorer(cfg)

    def score(completion: str, problem: Problem) -> float:
        return float(is_correct(scorer.score(completion, problem)))

    return score


@dataclass
class EvalResult:
    """Accuracy overall and by group, with per-sample records."""

    accuracy: float
    num: int
    by_group: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)


# With continuous batching and a progress line, problems go to the slots this many
# ``batch_size``s at a time: the slots refill within a call, and progress still moves.
SLOT_CHUNKS = 8


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
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Decode every problem once with the built-in engine and score it; ``group_key`` splits
    accuracy by a metadata field.

    With ``progress``, problems are decoded ``cfg.batch_size`` at a time (with
    ``cfg.continuous_batching``, :data:`SLOT_CHUNKS` times that many through the slots, so
    finished rows are still replaced) and ``progress(n)`` is called after each is scored."""
    tok = loaded.tokenizer
    scorer = scorer or correctness_scorer()
    engine = TorchEngine(
        loaded.model,
        loaded.mask_token_id,
        eos_id=loaded.eos_token_id,
        stop_ids=loaded.stop_token_ids,
        pad_id=loaded.pad_token_id,
        max_batch_size=cfg.batch_size,
    )
    options = DecodeOptions.from_config(cfg)
    samples: list[dict[str, Any]] = []
    stats = DecodeStats()
    size = cfg.batch_size * (SLOT_CHUNKS if cfg.continuous_batching else 1)
    for chunk, chunk_seed in _chunks(problems, size if progress else None, seed):
        texts, prompts = encode_problems(chunk, tok, prompt_format, chat_template)
        out = engine.generate(prompts, options, seed=chunk_seed)
        stats.merge(out.stats)
        completions = decode_completions(
            tok, out.completion_ids, loaded.eos_token_id, loaded.stop_token_ids
        )
        samples.extend(
            {
                "id": p.id,
                "prompt": text,
                "completion": completion,
                "answer": p.answer,
                "reward": scorer(completion, p),
                "group": None if group_key is None else str(p.metadata.get(group_key)),
            }
            for p, text, completion in zip(chunk, texts, completions, strict=True)
        )
        if progress is not None:
            progress(len(chunk))
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
        stats=stats,
    )


def _chunks(
    problems: Sequence[Problem], size: int | None, seed: int
) -> Iterator[tuple[Sequence[Problem], int]]:
    """All problems in one call (``size`` None), else batches of ``size`` with seeds
    ``seed``, ``seed + 1``, ... (the engine's own batching is the same, so greedy results
    do not change)."""
    if size is None:
        yield problems, seed
        return
    for k, start in enumerate(range(0, len(problems), size)):
        yield problems[start : start + size], seed + k
