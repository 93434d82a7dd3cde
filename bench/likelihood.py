"""Cost of each loss's likelihood terms: forwards and wall time per sample at n = 1, 2, 4, 8 draws.

Runs every registered loss (forward + backward) on the demo-sized built-in model (random
weights; cost does not depend on them) and prints, per loss and MC budget ``n``: model calls
per step (policy + reference + prompt-only), model rows per sample, milliseconds per sample,
and the ratio of that time to the d1 estimator's (one fully-masked forward per model).
Each EMBR loss runs a second time as ``<loss>+ref`` with the reference's energies scored once
beforehand (``rollout.score_reference``: rows carry a mask seed and the reference's ELBO/EUBO
on its draws), so its step runs the policy only; the per-row seeded mask draws are timed.

    .venv/bin/python bench/likelihood.py [--batch 32] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embr_rl.core.config import AlgoConfig, BuiltinModelConfig
from embr_rl.core.losses import LOSSES, LossBatch, LossModels, reference_energies, traits_of
from embr_rl.core.models import EmbrDiffusionConfig, EmbrDiffusionModel
from embr_rl.core.models.energy_head import EnergyHead

VOCAB, MASK_ID, PROMPT_LEN, COMPLETION_LEN, GROUP = 64, 63, 16, 32, 4


class Counting(nn.Module):
    """Counts calls and rows of the wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.rows = 0

    def forward(self, **kwargs: object) -> object:
        self.calls += 1
        self.rows += int(kwargs["input_ids"].shape[0])  # type: ignore[union-attr]
        return self.inner(**kwargs)


def demo_model() -> EmbrDiffusionModel:
    b = BuiltinModelConfig()
    cfg = EmbrDiffusionConfig(
        vocab_size=VOCAB,
        hidden_size=b.hidden_size,
        num_hidden_layers=b.num_layers,
        num_attention_heads=b.num_heads,
        intermediate_size=b.intermediate_size,
        max_position_embeddings=b.max_position_embeddings,
        mask_token_id=MASK_ID,
        pad_token_id=0,
        eos_token_id=1,
    )
    return EmbrDiffusionModel(cfg)


def _cfg(name: str, n: int, micro_batch: int) -> AlgoConfig:
    return dataclasses.replace(
        AlgoConfig(), name=name, num_mc_samples=n, micro_batch=micro_batch, antithetic=n > 1
    )


def run(batch_size: int, repeats: int, micro_batch: int) -> list[dict[str, float | str | int]]:
    torch.manual_seed(0)
    policy = Counting(demo_model().train())
    ref = Counting(demo_model().eval().requires_grad_(False))
    head = EnergyHead(BuiltinModelConfig().hidden_size, 64)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, VOCAB - 1, (batch_size // GROUP, PROMPT_LEN), generator=g)
    batch = LossBatch(
        prompt_ids=prompt.repeat_interleave(GROUP, 0),
        completion_ids=torch.randint(2, VOCAB - 1, (batch_size, COMPLETION_LEN), generator=g),
        rewards=torch.randint(0, 2, (batch_size,), generator=g).float(),
        group_ids=torch.arange(batch_size // GROUP).repeat_interleave(GROUP),
        models=LossModels(policy, MASK_ID, ref, head, torch.Generator().manual_seed(1)),
    )
    names = [*LOSSES, *(f"{n}+ref" for n in LOSSES if traits_of(n).energies)]
    configs = [(name, n) for name in names for n in (1, 2, 4, 8)]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    counts: dict[tuple[str, int], tuple[int, int]] = {}
    seeds = torch.arange(batch_size) // GROUP + 1000
    cached: dict[tuple[str, int], LossBatch] = {}
    for name, n in configs:
        if name.endswith("+ref"):
            cfg = _cfg(name.removesuffix("+ref"), n, micro_batch)
            seeded = dataclasses.replace(batch, mask_seeds=seeds)
            scored = dataclasses.replace(seeded, models=LossModels(ref, MASK_ID))
            lower, upper = reference_energies(scored, cfg, upper=traits_of(cfg.name).upper_bound)
            cached[(name, n)] = dataclasses.replace(seeded, ref_lower=lower, ref_upper=upper)
    # Round-robin over configurations so that load from other processes hits all alike.
    for rep in range(repeats + 1):
        for name, n in configs:
            cfg = _cfg(name.removesuffix("+ref"), n, micro_batch)
            policy.calls = policy.rows = ref.calls = ref.rows = 0
            policy.zero_grad(set_to_none=True)
            start = time.perf_counter()
            LOSSES[cfg.name](cached.get((name, n), batch), cfg).loss.backward()
            if rep:  # the first round warms up
                times[(name, n)].append(time.perf_counter() - start)
            counts[(name, n)] = (policy.calls + ref.calls, policy.rows + ref.rows)
    rows: list[dict[str, float | str | int]] = [
        {
            "loss": name,
            "n": n,
            "calls": counts[(name, n)][0],
            "rows_per_sample": counts[(name, n)][1] / batch_size,
            "ms_per_sample": 1000 * statistics.median(times[(name, n)]) / batch_size,
        }
        for name, n in configs
    ]
    base = statistics.median(float(r["ms_per_sample"]) for r in rows if r["loss"] == "d1")
    for r in rows:
        r["ratio_vs_d1"] = float(r["ms_per_sample"]) / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="completions per step (groups of 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=64, help="model rows per forward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.batch, args.repeats, args.micro_batch)
    print(
        f"demo model {BuiltinModelConfig().num_layers}x{BuiltinModelConfig().hidden_size}, "
        f"prompt {PROMPT_LEN} + completion {COMPLETION_LEN}, batch {args.batch}, "
        f"micro_batch {args.micro_batch}, threads {args.threads}, forward+backward, "
        f"antithetic for n>1, median of {args.repeats}"
    )
    print(f"{'loss':12} {'n':>2} {'calls':>6} {'rows/sample':>12} {'ms/sample':>10} {'x d1':>6}")
    for r in rows:
        print(
            f"{r['loss']:12} {r['n']:>2} {r['calls']:>6} {r['rows_per_sample']:>12.2f} "
            f"{r['ms_per_sample']:>10.2f} {r['ratio_vs_d1']:>6.2f}"
        )


if __name__ == "__main__":
    main()
