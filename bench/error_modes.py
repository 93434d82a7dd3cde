"""What an arithmetic model gets wrong: greedy held-out completions sorted by error mode.

    .venv/bin/python bench/error_modes.py [MODEL_DIR]   (default: the demo's shipped base model)

Counts, over the task's held-out problems decoded as ``configs/demo.yaml``'s evaluation does:
correct answers; completions without a ``\\boxed{}`` answer; boxes holding the last worked
step's result plus one (the planted error mode of ``pretrain.wrong_answer_share``); and
completions whose last worked step is right, i.e. what boxing the computed result would score.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from embr_rl.core.config import load_config
from embr_rl.core.models.loader import load_model
from embr_rl.core.tasks import load_task
from embr_rl.evaluation.evaluate import evaluate
from embr_rl.pretrain import WRONG_ANSWER_BASE_MODEL

_BOX = re.compile(r"\\boxed\{(-?\d+)\}")
_STEP = re.compile(r"=(-?\d+)")


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    path = argv[0] if argv else str(WRONG_ANSWER_BASE_MODEL)
    overrides = [f"model.path={path}"]
    if not (Path(path) / "tokenizer.json").is_file():  # a learner checkpoint: the base's tokenizer
        overrides.append(f"model.tokenizer={WRONG_ANSWER_BASE_MODEL}")
    cfg = load_config("configs/demo.yaml", overrides)
    result = evaluate(load_model(cfg.model), load_task(cfg.task, cfg.task.test_split), cfg.eval)
    counts = dict.fromkeys(("correct", "no_box", "box_is_last_plus_one", "last_step_right"), 0)
    for s in result.samples:
        gold = int(s["answer"])
        box = _BOX.search(s["completion"])
        steps = _STEP.findall(s["completion"].split("\\boxed")[0])
        counts["correct"] += s["reward"] > 0
        if box is None:
            counts["no_box"] += 1
        elif steps and int(box.group(1)) == int(steps[-1]) + 1:
            counts["box_is_last_plus_one"] += 1
        counts["last_step_right"] += bool(steps) and int(steps[-1]) == gold
    n = result.num
    print(f"{path}: {n} held-out problems, greedy")
    for k, v in counts.items():
        print(f"  {k:22s} {v:4d}  ({v / n:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
