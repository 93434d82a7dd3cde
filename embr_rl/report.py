"""End-of-run outputs from ``metrics.jsonl``: the summary table and ``reward.png``.

``reward.png`` has the paper's Figure 1 shape: training reward (per step, and a moving
average) and held-out accuracy against learner step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key``; when a resumed run logged a step twice, the last wins."""
    by_step: dict[int, float] = {}
    for r in records:
        if key in r and "event" not in r:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def summary_rows(records: Sequence[dict[str, Any]], wall_seconds: float) -> list[tuple[str, str]]:
    """``(name, value)`` rows of the end-of-run table."""
    rows: list[tuple[str, str]] = []
    steps, loss = series(records, "learner/loss")
    rows.append(("learner steps", str(steps[-1] if steps else 0)))
    acc_steps, acc = series(records, "eval/accuracy")
    if acc:
        rows.append((f"eval accuracy at step {acc_steps[0]}", f"{acc[0]:.3f}"))
        rows.append((f"eval accuracy at step {acc_steps[-1]}", f"{acc[-1]:.3f}"))
        rows.append(("eval accuracy, best", f"{max(acc):.3f}"))
    _, reward = series(records, "rollout/reward_mean")
    if reward:
        k = max(1, len(reward) // 10)
        rows.append(("rollout reward, first 10% of batches", f"{sum(reward[:k]) / k:.3f}"))
        rows.append(("rollout reward, last 10% of batches", f"{sum(reward[-k:]) / k:.3f}"))
    _, samples = series(records, "rollout/samples_total")
    if samples:
        rows.append(("samples generated", f"{samples[-1]:.0f}"))
    if loss:
        rows.append(("final learner loss", f"{loss[-1]:.4g}"))
    _, stale = series(records, "learner/staleness_mean")
    if stale:
        rows.append(("mean sample staleness (versions)", f"{sum(stale) / len(stale):.2f}"))
    restarts = sum(1 for r in records if r.get("event") == "worker_restarted")
    rows.append(("rollout worker restarts", str(restarts)))
    rows.append(("wall time", f"{wall_seconds:.0f} s"))
    return rows


def read_eval_samples(path: str | os.PathLike[str]) -> dict[str, float]:
    """``{problem id: reward}`` of an evaluator's ``eval/*.jsonl``."""
    from embr_rl.telemetry import read_jsonl

    return {str(rec["id"]): float(rec["reward"]) for rec in read_jsonl(path)}


def paired_flips(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[int, int]:
    """Problems wrong before and right after (fixed), and right before and wrong after (broken)."""
    common = before.keys() & after.keys()
    fixed = sum(1 for k in common if before[k] <= 0 < after[k])
    broken = sum(1 for k in common if after[k] <= 0 < before[k])
    return fixed, broken


def sign_test_p(fixed: int, broken: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) of ``fixed`` vs ``broken`` flips."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column Markdown table."""
    width = max([len("metric"), *(len(a) for a, _ in rows)])
    vwidth = max([len("value"), *(len(b) for _, b in rows)])
    lines = [
        f"| {'metric':<{width}} | {'value':>{vwidth}} |",
        f"|{'-' * (width + 2)}|{'-' * (vwidth + 1)}:|",
    ]
    lines += [f"| {a:<{width}} | {b:>{vwidth}} |" for a, b in rows]
    return "\n".join(lines)


def plot_rewards(
    records: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Write ``reward.png``: training reward and eval accuracy against learner step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps, reward = series(records, "rollout/reward_mean")
    if steps:
        ax.plot(steps, reward, color="tab:blue", alpha=0.25, lw=1)
        ax.plot(
            steps,
            moving_average(reward, max(1, len(reward) // 20)),
            color="tab:blue",
            lw=2,
            label="training reward (moving average)",
        )
    acc_steps, acc = series(records, "eval/accuracy")
    if acc_steps:
        ax.plot(acc_steps, acc, "o-", color="tab:red", lw=2, label="eval accuracy (temperature 0)")
    ax.set_xlabel("learner step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if steps or acc_steps:
        ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
