"""RL sanity check: an easy reward the base model earns sometimes must be learned.

Reward ``even_answer`` (1.0 when the boxed answer is an even integer, right or wrong): the
demo base model earns it on about half of its samples. Every online algorithm must drive
the rollout reward from that base rate to at least 95% within 100 learner steps, with its
default settings (``configs/demo.yaml`` and the algorithm's defaults in ``embr_rl.config``).
The loop is Algorithm 1 in one process (:class:`embr_rl.local_loop.LocalLoop`), seeded, so
a failure reproduces exactly.
"""

from __future__ import annotations

import pytest
import torch

from embr_rl.config import load_config
from embr_rl.local_loop import LocalLoop, StepRecord
from embr_rl.pretrain import WRONG_ANSWER_BASE_MODEL
from learner.learner import shutdown_distributed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TARGET, MAX_STEPS, WINDOW = 0.95, 100, 3


def _reached(history: list[StepRecord]) -> bool:
    recent = [r.reward for r in history[-WINDOW:]]
    return len(recent) == WINDOW and sum(recent) / WINDOW >= TARGET


# Not met yet (issue 14): with block-wise masking the gradient reaches the answer tokens, but
# no algorithm drives this reward to 95% within 100 steps at any learning rate tried (small
# steps learn slowly, large ones leave the reference and destroy the model); figures in
# docs/results.md. Not run by default (about 100 s per algorithm); `--runxfail` runs it.
@pytest.mark.xfail(
    run=False, strict=True, reason="issue 14: easy reward not yet learned in 100 steps"
)
@pytest.mark.parametrize("algo", ["embr_e", "embr_c", "embr_u", "d1", "wd1"])
def test_easy_reward_is_learned(algo: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(
        "configs/demo.yaml",
        [
            f"model.path={WRONG_ANSWER_BASE_MODEL}",
            f"algo.name={algo}",
            "algo.mode=sync",
            "verifier.reward=even_answer",
            "verifier.num_processes=1",
            "rollout.num_workers=1",
        ],
    )
    loop = LocalLoop(cfg)
    try:
        history = loop.run(MAX_STEPS, until=_reached)
    finally:
        loop.close()
        shutdown_distributed()
    rewards = [r.reward for r in history]
    assert rewards[0] < 0.8, f"the base rate {rewards[0]:.2f} leaves nothing to learn"
    assert _reached(history), (
        f"{algo}: reward {rewards[0]:.2f} -> {rewards[-1]:.2f} after {len(history)} steps "
        f"(needs a mean of {TARGET} over {WINDOW} rounds); curve {[round(r, 2) for r in rewards]}"
    )
