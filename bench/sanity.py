"""One RL sanity curve (the settings of tests/integration/test_rl_sanity.py) with overrides.

Prints, and writes to ``--out`` as JSON, the rollout reward of every learner step until the
bar (a 3-step mean of 0.95) or ``--steps``, and every fifth step's learner metrics.

    .venv/bin/python bench/sanity.py embr_u algo.eubo_estimator=gap algo.num_mc_samples=8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.localrun import SWEEP_START
from embr_rl.core.config import load_config
from embr_rl.local_loop import LocalLoop, StepRecord
from learner.learner import shutdown_distributed

SANITY = [
    "algo.mode=sync",
    "verifier.reward=even_answer",
    "verifier.num_processes=1",
    "rollout.num_workers=1",
    "rollout.prompts_per_batch=16",
    "learner.lr_schedule=constant",
    *SWEEP_START,
]


def _reached(history: list[StepRecord]) -> bool:
    recent = [r.reward for r in history[-3:]]
    return len(recent) == 3 and sum(recent) / 3 >= 0.95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("algo")
    ap.add_argument("overrides", nargs="*", help="key=value, after the test's settings")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/demo.yaml", [*SANITY, f"algo.name={args.algo}", *args.overrides])
    loop = LocalLoop(cfg)
    start = time.monotonic()
    try:
        history = loop.run(args.steps, until=_reached, log=lambda r: None)
    finally:
        loop.close()
        shutdown_distributed()
    curve = [round(r.reward, 3) for r in history]
    out = {
        "algo": args.algo,
        "overrides": args.overrides,
        "steps": len(history),
        "reached": _reached(history),
        "seconds": round(time.monotonic() - start),
        "best_3_step_mean": round(max(sum(curve[i : i + 3]) / 3 for i in range(len(curve) - 2)), 3),
        "last_20_mean": round(sum(curve[-20:]) / len(curve[-20:]), 3),
        "curve": curve,
        "metrics": [{k: round(v, 3) for k, v in r.metrics.items()} for r in history[::5]],
    }
    text = json.dumps(out)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
