"""EMBR-U's bracket on real batches: how often the EUBO estimate falls below the ELBO, by
estimator setting, and what each setting costs per learner step (side by side, one run).

::

    .venv/bin/python bench/bracket.py [--warmup-steps 20] [--repeats 8]

Trains EMBR-U from the shipped demo base model for ``--warmup-steps`` sync steps (so the
policy and the reference differ, as in training), then takes the next rollout batch (16
prompts x 8 = 128 rows) and scores it ``--repeats`` times with fresh masks under each setting.
An inversion is a row whose EUBO estimate is below its ELBO estimate, for the policy or the
reference (2 x 128 rows per repeat; ``learner/bound_inversions`` in training counts the same).
Cost: the time of EMBR-U's loss forward and backward on the batch, relative to the demo's
setting (4 draws), measured interleaved in this process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.localrun import BASE_CONFIG, LOCAL_OVERRIDES

SETTINGS: dict[str, dict[str, object]] = {
    "4 draws (demo)": {"num_mc_samples": 4},
    "8 draws": {"num_mc_samples": 8},
    "8 draws, complementary pairs": {"num_mc_samples": 8, "antithetic": True},
    "16 draws": {"num_mc_samples": 16},
    "16 draws, complementary pairs": {"num_mc_samples": 16, "antithetic": True},
    "4 draws, gamma 1.0": {"num_mc_samples": 4, "eubo_gamma": 1.0},
    "8 draws, complementary pairs, gamma 1.0": {
        "num_mc_samples": 8,
        "antithetic": True,
        "eubo_gamma": 1.0,
    },
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from embr_rl.core.config import load_config
    from embr_rl.core.losses import compute_energies, get_loss
    from embr_rl.local_loop import LocalLoop
    from learner.batching import to_loss_batch
    from learner.learner import shutdown_distributed

    cfg = load_config(
        str(BASE_CONFIG),
        [
            *LOCAL_OVERRIDES,
            "algo.name=embr_u",
            f"seed={args.seed}",
            f"learner.total_steps={max(args.warmup_steps, 1)}",
        ],
    )
    loop = LocalLoop(cfg)
    loop.run(args.warmup_steps)
    rows = loop.worker.generate(loop.stream.take(cfg.rollout.prompts_per_batch))
    learner = loop.learner
    batch = to_loss_batch(rows, learner.models, ids=learner.ids, span=cfg.algo.likelihood_span)
    gen = torch.Generator().manual_seed(args.seed + 1)
    models = replace(learner.models, generator=gen)
    batch = replace(batch, models=models)
    loss_fn = get_loss("embr_u")
    policy = learner.models.policy

    inversions: dict[str, list[float]] = {k: [] for k in SETTINGS}
    widths: dict[str, list[float]] = {k: [] for k in SETTINGS}
    seconds: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for _ in range(args.repeats):
        for name, knobs in SETTINGS.items():  # interleaved, so load drifts hit every setting
            algo = replace(copy.deepcopy(cfg.algo), **knobs)
            with torch.no_grad():
                e = compute_energies(batch, algo, upper=True)
            assert e.ut is not None and e.ur is not None
            bad = (e.ut < e.lt).sum() + (e.ur < e.lr).sum()
            inversions[name].append(float(bad) / (2 * len(e.lt)))
            widths[name].append(float((e.ut - e.lt).mean()))
            policy.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = loss_fn(batch, algo)
            out.loss.backward()
            seconds[name].append(time.perf_counter() - t0)
    policy.zero_grad(set_to_none=True)
    loop.close()
    shutdown_distributed()

    ref = statistics.median(seconds["4 draws (demo)"])
    print(
        f"EMBR-U after {args.warmup_steps} steps from the shipped base model; one batch of "
        f"{len(batch.rewards)} rows scored {args.repeats} times per setting (seed {args.seed})\n"
    )
    print("| setting | rows with EUBO < ELBO | max of the repeats | mean EUBO - ELBO (nats) "
          "| loss fwd+bwd (s) | cost vs. 4 draws |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in SETTINGS:
        inv, sec = inversions[name], statistics.median(seconds[name])
        print(
            f"| {name} | {100 * statistics.fmean(inv):.1f}% | {100 * max(inv):.1f}% | "
            f"{statistics.fmean(widths[name]):.1f} | {sec:.2f} | {sec / ref:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
