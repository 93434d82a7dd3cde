"""Reproduction study of the EMBR paper's claims on the synthetic arith task (CPU scale).

One command reruns the whole study and writes ``<out>/report.md`` and
``<out>/reward_curves.png``::

    .venv/bin/python bench/repro.py --out runs/repro [--seeds 0,1,2] \\
        [--settings online,stale,offline] [--scale small|tiny]
    .venv/bin/python bench/repro.py --report-only --out runs/repro   # tables and PNG only

Settings (every method of one setting gets the same generated samples and learner steps):

- ``online`` (paper Table 1, Figure 1): EMBR-E, EMBR-C, EMBR-U vs d1 (diffu-GRPO) and wd1,
  as ``algo.mode=sync`` with ``algo.inner_iterations=1``: a fresh on-policy batch per step.
- ``stale`` (off-policy stress): the same methods with each fresh batch reused for ``K+1``
  updates (``algo.inner_iterations=K+1``), so the last update sees samples ``K`` policy
  versions old; ``K`` in ``--stale-k`` (0, 2, 8). ``K=0`` is exactly the online
  configuration, so its column reuses the online runs. A (method, K) pair the config
  rejects (d1 with ``K>0``) is not run; the report quotes the config's reason.
- ``offline`` (paper Table 2): EMBR-C and EMBR-U vs DPO-ELBO and VRPO on one fixed dataset of
  scored samples from the base model, generated once per seed (``<out>/offline/data/``)
  with as many samples as one online run generates.

Every run is ``embr_rl.run.run`` in this process on one shared local Ray instance, with
``logging.run_dir=<out>/<setting>/[K<k>/]<algo>/seed<s>``; a run whose ``summary.json``
says it finished is skipped, so an interrupted study resumes. Each finished run appends one
line to ``<out>/results.jsonl``; the report is built from that file only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "demo.yaml"
DEFAULT_BASE_MODEL = REPO / "runs" / "demo" / "base_model"
SETTINGS = ("online", "stale", "offline")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
DEFAULT_STALE_K = (0, 2, 8)


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One algorithm of the study: its label in tables and its own config overrides."""

    label: str
    note: str
    overrides: tuple[str, ...] = ()


# Every method runs with the hyperparameters of configs/demo.yaml (learner.lr 1e-4,
# algo.beta 0.05, algo.num_mc_samples 4 and the schema defaults clip_eps 0.2 and kl_coef
# 0.04 for d1). No method was tuned separately for this study; a method that needs its own
# settings gets them here as key=value overrides, applied after the scale's overrides.
METHODS: dict[str, Method] = {
    "embr_e": Method("EMBR-E", "energy matching with a learned c_phi head"),
    "embr_c": Method("EMBR-C", "contrastive energy matching within a prompt's group"),
    "embr_u": Method("EMBR-U", "upper bound of the matching loss"),
    "d1": Method("d1 (diffu-GRPO)", "clipped ratio to the sampling policy, k3 KL"),
    "wd1": Method("wd1", "ratio-free weighted likelihood"),
    "dpo": Method("DPO-ELBO", "DPO with the ELBO as log-likelihood"),
    "vrpo": Method("VRPO", "DPO-ELBO with variance-reduced ELBO estimates"),
}
ONLINE_METHODS = ("embr_e", "embr_c", "embr_u", "d1", "wd1")
OFFLINE_METHODS = ("embr_c", "embr_u", "dpo", "vrpo")


# --------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    """A study size: overrides applied to configs/demo.yaml for every run, and the nominal
    ``eval.every`` (rounded down to whole sync rounds per run, see :func:`eval_every`)."""

    description: str
    overrides: tuple[str, ...]
    eval_every: int


SCALES: dict[str, Scale] = {
    # Smoke test: seconds per run plus actor start-up.
    "tiny": Scale(
        "smoke test: 2 learner steps of 8 rows, 1 worker, 8 test problems",
        (
            "rollout.num_workers=1",
            "rollout.num_cpus_per_worker=0.5",
            "rollout.prompts_per_batch=2",
            "rollout.group_size=4",
            "learner.num_cpus_per_rank=0.5",
            "learner.batch_size=8",
            "learner.micro_batch_size=4",
            "learner.total_steps=2",
            "algo.num_mc_samples=1",
            "task.arith.num_train=2000",
            "eval.limit=8",
            "eval.batch_size=8",
        ),
        eval_every=1,
    ),
    # The study on a 2-core CPU: one round of 2 workers x 4 prompts x 8 completions is exactly
    # one learner batch of 64 rows, so K+1 updates reuse the same 64 samples; 27 steps is a
    # multiple of K+1 for K in {0, 2, 8}, so every K ends on a full round, and so is the
    # evaluation interval 9 (evaluations at steps 0, 9, 18 and 27 for every K).
    "small": Scale(
        "the study: 27 learner steps of 64 rows, 2 workers, 500 test problems, "
        "evaluated before the first step and after the last",
        (
            "rollout.num_workers=2",
            "rollout.prompts_per_batch=4",
            "rollout.group_size=8",
            "learner.batch_size=64",
            "learner.micro_batch_size=16",
            "learner.total_steps=27",
            "eval.limit=500",
        ),
        eval_every=0,
    ),
}

# Set for every run (outputs, no dashboard, no intermediate checkpoints, before/after eval).
COMMON_OVERRIDES = (
    "logging.progress=never",
    "logging.tensorboard=false",
    "cluster.dashboard=false",
    "checkpoint.every=0",
    "eval.at_start=true",
    "eval.temperature=0.0",
)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunSpec:
    """One training run: setting (``online``, ``stale``, ``offline``), algorithm, seed, and
    staleness ``k`` (sync rounds of ``k + 1`` updates; None offline)."""

    seed: int
    setting: str
    k: int | None
    algo: str

    @property
    def key(self) -> str:
        """The run's folder below the study's output folder (also its id in results.jsonl)."""
        if self.setting == "stale":
            return f"stale/K{self.k}/{self.algo}/seed{self.seed}"
        return f"{self.setting}/{self.algo}/seed{self.seed}"

    def run_dir(self, out: Path) -> Path:
        """``<out>/<key>``."""
        return out / self.key


@dataclass(frozen=True)
class Rejected:
    """A (method, K) pair the config refuses, with the config's own message."""

    setting: str
    algo: str
    k: int | None
    reason: str


def parse_list(text: str, allowed: Iterable[str] | None = None) -> list[str]:
    """Comma-separated items (blanks dropped); raises ``ValueError`` for one not in ``allowed``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("empty list")
    if allowed is not None:
        ok = list(allowed)
        bad = [t for t in items if t not in ok]
        if bad:
            raise ValueError(f"unknown item {bad[0]!r}; allowed: {', '.join(ok)}")
    return items


def parse_ints(text: str) -> list[int]:
    """Comma-separated non-negative integers, e.g. ``0,1,2``."""
    values = [int(t) for t in parse_list(text)]
    if any(v < 0 for v in values):
        raise ValueError(f"negative value in {text!r}")
    return values


def plan_runs(
    seeds: Sequence[int], settings: Sequence[str], stale_k: Sequence[int]
) -> list[RunSpec]:
    """Every run of the study, seed-major (an interrupted study has whole seeds first).

    The stale setting's ``K=0`` runs are the online runs (identical configuration), so they
    appear once, as ``online``.
    """
    specs: set[RunSpec] = set()
    for seed in seeds:
        if "online" in settings:
            specs.update(RunSpec(seed, "online", 0, a) for a in ONLINE_METHODS)
        if "stale" in settings:
            for k in stale_k:
                setting = "online" if k == 0 else "stale"
                specs.update(RunSpec(seed, setting, k, a) for a in ONLINE_METHODS)
        if "offline" in settings:
            specs.update(RunSpec(seed, "offline", None, a) for a in OFFLINE_METHODS)
    order = {s: i for i, s in enumerate(SETTINGS)}
    return sorted(specs, key=lambda s: (s.seed, order[s.setting], s.k or 0, s.algo))


def eval_every(nominal: int, k: int | None) -> int:
    """``nominal`` rounded down to a multiple of the sync round length ``k + 1`` (0: no
    evaluation between the first and the last).

    Evaluating only at round ends keeps every evaluation at a whole number of rounds (the
    driver keeps a round's rows through a mid-round evaluation since the fix for that, but
    round ends make the evaluated policies comparable across K).
    """
    if k is None:
        return nominal
    return nominal // (k + 1) * (k + 1)


def run_overrides(
    spec: RunSpec, scale: str, out: Path, base_model: Path, offline_path: Path | None = None
) -> list[str]:
    """The ``key=value`` overrides of configs/demo.yaml for ``spec`` (scale, method, mode)."""
    mode: list[str]
    if spec.setting == "offline":
        if offline_path is None:
            raise ValueError(f"{spec.key}: an offline run needs its dataset path")
        mode = ["algo.mode=offline", f"buffer.offline_path={offline_path}"]
    else:
        mode = ["algo.mode=sync", f"algo.inner_iterations={(spec.k or 0) + 1}"]
    return [
        *SCALES[scale].overrides,
        f"eval.every={eval_every(SCALES[scale].eval_every, spec.k)}",
        *COMMON_OVERRIDES,
        f"logging.run_dir={spec.run_dir(out)}",
        f"model.path={base_model}",
        f"seed={spec.seed}",
        f"algo.name={spec.algo}",
        *mode,
        *METHODS[spec.algo].overrides,
    ]


# --------------------------------------------------------------------------- per-run results


def metric_series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in metrics.jsonl records (events skipped, last wins)."""
    by_step: dict[int, float] = {}
    for r in records:
        if key in r and "event" not in r and r[key] is not None:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def last_quarter_mean(steps: Sequence[int], values: Sequence[float], total: int) -> float | None:
    """Mean training reward over the last 25% of the ``total`` learner steps.

    A reward logged at step ``s`` is the reward of the batch the learner trains on from
    step ``s`` until the next logged one (sync rounds with ``K+1`` updates log once per
    round), so values are carried forward step by step before averaging steps
    ``total - ceil(total / 4) + 1 .. total``. None when nothing was logged by then.
    """
    if total < 1 or not steps:
        return None
    first = total - math.ceil(total / 4) + 1
    pairs = sorted(zip(steps, values, strict=True))
    taken: list[float] = []
    i, current = 0, None
    for step in range(1, total + 1):
        while i < len(pairs) and pairs[i][0] <= step:
            current = pairs[i][1]
            i += 1
        if step >= first and current is not None:
            taken.append(current)
    return sum(taken) / len(taken) if taken else None


def result_row(
    spec: RunSpec,
    summary: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    *,
    scale: str,
    total_steps: int,
    wall_measured: float | None,
    status: str = "done",
) -> dict[str, Any]:
    """The line written to results.jsonl for a finished run."""
    reward_steps, rewards = metric_series(records, "rollout/reward_mean")
    eval_steps, accs = metric_series(records, "eval/accuracy")
    before, after = summary.get("eval/accuracy_before"), summary.get("eval/accuracy_after")
    return {
        "key": spec.key,
        "setting": spec.setting,
        "k": spec.k,
        "algo": spec.algo,
        "seed": spec.seed,
        "scale": scale,
        "status": status,
        "steps": summary.get("steps"),
        "total_steps": total_steps,
        "samples": summary.get("samples"),
        "policy_version": summary.get("policy_version"),
        "acc_before": before,
        "acc_after": after,
        "gain": None if before is None or after is None else after - before,
        "eval_steps": eval_steps,
        "eval_accuracy": accs,
        "reward_steps": reward_steps,
        "reward": rewards,
        "train_reward_last25": last_quarter_mean(reward_steps, rewards, total_steps),
        "wall_seconds": summary.get("wall_seconds"),
        "wall_measured": None if wall_measured is None else round(wall_measured, 1),
    }


def is_finished(summary: Mapping[str, Any] | None, total_steps: int) -> bool:
    """A summary of a run that reached ``total_steps`` without being stopped by a signal."""
    return (
        summary is not None
        and not summary.get("stopped_by")
        and int(summary.get("steps") or 0) >= total_steps
    )


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of results.jsonl, one per run key (the last line of a key wins)."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row:
            rows[row["key"]] = row
    return list(rows.values())


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (std None for a single seed)."""

    mean: float | None
    std: float | None
    n: int


def mean_std(values: Iterable[float | None]) -> Stat:
    """:class:`Stat` of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def fmt_stat(stat: Stat, *, percent: bool = True, digits: int = 1, signed: bool = False) -> str:
    """``41.2 ± 1.3`` (percent points by default); ``n/a`` without values."""
    if stat.mean is None:
        return "n/a"
    scale = 100.0 if percent else 1.0
    sign = "+" if signed else ""
    text = f"{stat.mean * scale:{sign}.{digits}f}"
    if stat.std is not None:
        text += f" ± {stat.std * scale:.{digits}f}"
    return text


def select(
    rows: Iterable[Mapping[str, Any]], *, setting: str, algo: str, k: int | None = None
) -> list[Mapping[str, Any]]:
    """Finished rows of one cell; ``setting="stale"`` with ``k=0`` reads the online runs."""
    if setting == "stale" and k == 0:
        setting = "online"
    return [
        r
        for r in rows
        if r.get("status") == "done"
        and r["setting"] == setting
        and r["algo"] == algo
        and (setting != "stale" or r["k"] == k)
    ]


def cell(rows: Iterable[Mapping[str, Any]], field_name: str) -> Stat:
    """Mean and std over seeds of ``field_name``."""
    return mean_std(r.get(field_name) for r in rows)


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the others right-aligned)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def equal_budgets(rows: Iterable[Mapping[str, Any]]) -> bool:
    """Whether all finished rows had the same learner steps and generated samples."""
    seen = {(r.get("steps"), r.get("samples")) for r in rows if r.get("status") == "done"}
    return len(seen) <= 1


def online_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Online setting: methods as rows."""
    body = []
    for algo in ONLINE_METHODS:
        cell_rows = select(rows, setting="online", algo=algo)
        body.append(
            [
                METHODS[algo].label,
                fmt_stat(cell(cell_rows, "acc_after")),
                fmt_stat(cell(cell_rows, "gain"), signed=True),
                fmt_stat(cell(cell_rows, "train_reward_last25"), percent=False, digits=3),
                fmt_stat(cell(cell_rows, "wall_seconds"), percent=False, digits=0),
                str(len(cell_rows)),
            ]
        )
    header = [
        "method",
        "final accuracy (%)",
        "gain over base (points)",
        "train reward, last 25% of steps",
        "wall time (s)",
        "seeds",
    ]
    return markdown_table(header, body)


def stale_tables(
    rows: Sequence[Mapping[str, Any]], stale_k: Sequence[int], rejected: Sequence[Rejected]
) -> str:
    """Off-policy stress: one table per metric, methods as rows, ``K`` as columns."""
    refused = {(r.algo, r.k) for r in rejected}
    parts = []
    for title, name, percent, signed, digits in (
        ("Final accuracy (%)", "acc_after", True, False, 1),
        ("Gain over the base model (points)", "gain", True, True, 1),
        ("Training reward, last 25% of steps", "train_reward_last25", False, False, 3),
    ):
        body = []
        for algo in ONLINE_METHODS:
            line = [METHODS[algo].label]
            for k in stale_k:
                if (algo, k) in refused:
                    line.append("rejected")
                    continue
                stat = cell(select(rows, setting="stale", algo=algo, k=k), name)
                line.append(fmt_stat(stat, percent=percent, digits=digits, signed=signed))
            body.append(line)
        parts.append(
            f"{title}:\n\n" + markdown_table(["method", *[f"K={k}" for k in stale_k]], body)
        )
    return "\n\n".join(parts)


def offline_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Offline setting: methods as rows."""
    body = []
    for algo in OFFLINE_METHODS:
        cell_rows = select(rows, setting="offline", algo=algo)
        body.append(
            [
                METHODS[algo].label,
                fmt_stat(cell(cell_rows, "acc_after")),
                fmt_stat(cell(cell_rows, "gain"), signed=True),
                fmt_stat(cell(cell_rows, "wall_seconds"), percent=False, digits=0),
                str(len(cell_rows)),
            ]
        )
    header = ["method", "final accuracy (%)", "gain over base (points)", "wall time (s)", "seeds"]
    return markdown_table(header, body)


def per_run_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every run's own numbers."""

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    def num(v: Any, digits: int) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    def count(v: Any) -> str:
        return "n/a" if v is None else str(v)

    order = {s: i for i, s in enumerate(SETTINGS)}
    body = []
    for r in sorted(rows, key=lambda r: (order[r["setting"]], r["k"] or 0, r["algo"], r["seed"])):
        body.append(
            [
                r["setting"],
                "-" if r["k"] is None else str(r["k"]),
                METHODS[r["algo"]].label,
                str(r["seed"]),
                r["status"],
                count(r.get("steps")),
                count(r.get("samples")),
                pct(r.get("acc_before")),
                pct(r.get("acc_after")),
                num(None if r.get("gain") is None else 100 * r["gain"], 1),
                num(r.get("train_reward_last25"), 3),
                num(r.get("wall_seconds"), 1),
            ]
        )
    header = [
        "setting",
        "K",
        "method",
        "seed",
        "status",
        "steps",
        "samples",
        "acc before (%)",
        "acc after (%)",
        "gain",
        "reward last 25%",
        "wall (s)",
    ]
    return markdown_table(header, body)


def mean_curve(
    series: Sequence[tuple[Sequence[int], Sequence[float]]],
) -> tuple[list[int], list[float], list[float]]:
    """Mean and standard error over runs at the steps every run logged."""
    if not series:
        return [], [], []
    common = set(series[0][0])
    for steps, _ in series[1:]:
        common &= set(steps)
    xs = sorted(common)
    lookups = [dict(zip(s, v, strict=True)) for s, v in series]
    means, sems = [], []
    for x in xs:
        vals = [d[x] for d in lookups]
        means.append(statistics.fmean(vals))
        sems.append(statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0)
    return xs, means, sems


def plot_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Figure 1 shape: online training reward (mean ± s.e. over seeds) and eval accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    drawn = False
    for algo in ONLINE_METHODS:
        runs = select(rows, setting="online", algo=algo)
        if not runs:
            continue
        drawn = True
        label = f"{METHODS[algo].label} (n={len(runs)})"
        xs, mean, sem = mean_curve([(r["reward_steps"], r["reward"]) for r in runs])
        (line,) = top.plot(xs, mean, label=label)
        top.fill_between(
            xs, [m - s for m, s in zip(mean, sem)], [m + s for m, s in zip(mean, sem)],
            color=line.get_color(), alpha=0.2,
        )  # fmt: skip
        xs, mean, sem = mean_curve([(r["eval_steps"], r["eval_accuracy"]) for r in runs])
        bottom.errorbar(
            xs, [100 * m for m in mean], yerr=[100 * s for s in sem], marker="o", capsize=3,
            color=line.get_color(), label=label,
        )  # fmt: skip
    top.set_ylabel("training reward (rollout mean)")
    top.set_title("online (sync, fresh batch every step): mean ± s.e. over seeds")
    bottom.set_ylabel("held-out accuracy, temperature 0 (%)")
    bottom.set_xlabel("learner step")
    if drawn:
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    else:
        top.text(0.5, 0.5, "no finished online runs", ha="center", transform=top.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_report(
    rows: Sequence[Mapping[str, Any]],
    study: Mapping[str, Any],
    invocations: Sequence[Mapping[str, Any]],
    datasets: Sequence[Mapping[str, Any]],
    report_command: str | None = None,
) -> str:
    """report.md: commands, scale, wall time, tables per setting, per-run numbers."""
    stale_k = list(study.get("stale_k", DEFAULT_STALE_K))
    rejected = [Rejected(**r) for r in study.get("rejected", [])]
    settings = list(study.get("settings", SETTINGS))
    done = [r for r in rows if r.get("status") == "done"]
    failed = [r for r in rows if r.get("status") != "done"]
    out: list[str] = ["# EMBR reproduction study (synthetic arith task)", ""]
    out.append("Generated by `bench/repro.py` from `results.jsonl`; no number is typed by hand.")
    out += ["", "## Commands", ""]
    for inv in invocations:
        secs = inv.get("wall_seconds")
        out.append(
            f"- `{inv['command']}` (started {inv.get('started', '?')}, "
            + (f"{secs:.0f} s" if secs is not None else "did not finish")
            + f", {inv.get('runs_executed', 0)} runs executed, "
            f"{inv.get('runs_skipped', 0)} already finished)"
        )
    if report_command:
        out.append(f"- report rebuilt with `{report_command}`")
    total_wall = sum(inv.get("wall_seconds") or 0.0 for inv in invocations)
    run_wall = sum(r.get("wall_measured") or r.get("wall_seconds") or 0.0 for r in rows)
    out += [
        "",
        f"Total wall time of the study commands: {total_wall:.0f} s "
        f"({total_wall / 60:.1f} min); sum over runs: {run_wall:.0f} s.",
    ]
    scale = study.get("scale", "?")
    out += ["", f"## Scale `{scale}`", "", study.get("scale_description", ""), ""]
    out.append(f"Base config `{study.get('base_config')}`, base model `{study.get('base_model')}`.")
    out.append(f"Seeds {study.get('seeds')}, settings {settings}, stale K {stale_k}.")
    out += ["", "Overrides of the base config for every run:", "", "```text"]
    out += [*study.get("scale_overrides", []), *study.get("common_overrides", []), "```"]
    out += [
        "",
        f"`eval.every`: {study.get('eval_every')}, rounded down per run to a multiple of the "
        "sync round length K+1 (0: evaluated only before the first and after the last step), "
        "so every evaluated policy ends a whole round.",
    ]
    out += ["", "Methods (label, algo.name, own overrides):", ""]
    for name, m in study.get("methods", {}).items():
        extra = " ".join(m.get("overrides", [])) or "none (configs/demo.yaml)"
        out.append(f"- {m['label']} (`{name}`): {m['note']}; overrides: {extra}")
    befores = sorted({round(r["acc_before"], 6) for r in done if r.get("acc_before") is not None})
    out += ["", "## Base model", ""]
    if befores:
        out.append(
            "Accuracy before training (step 0 evaluation of every run, same test problems): "
            + ", ".join(f"{100 * b:.1f}%" for b in befores)
            + (" (identical in every run)" if len(befores) == 1 else " (differs between runs)")
            + "."
        )
    else:
        out.append("No finished run yet.")

    if "online" in settings:
        out += ["", "## Online (paper Table 1, Figure 1)", ""]
        out.append(
            "`algo.mode=sync`, `algo.inner_iterations=1`: a fresh on-policy batch every step. "
            f"Equal steps and samples across runs: {yes_no(equal_budgets(select_setting(rows, 'online')))}."
        )
        out += ["", online_table(rows), "", "![reward curves](reward_curves.png)"]
    if "stale" in settings:
        out += ["", "## Off-policy stress (samples up to K policy versions stale)", ""]
        out.append(
            "`algo.mode=sync`, `algo.inner_iterations=K+1`: each fresh batch is used for K+1 "
            "updates. K=0 is the online configuration and reuses the online runs. K counts "
            "learner updates since the samples' policy; the driver's `learner/staleness_max` "
            "stays 0 in sync mode because its policy version counts broadcasts (one per round)."
        )
        for k in stale_k:
            cell_rows = select_setting(rows, "online" if k == 0 else "stale", k)
            out.append(
                f"- K={k}: equal steps and samples across runs: {yes_no(equal_budgets(cell_rows))}."
            )
        for r in rejected:
            out.append(
                f"- {METHODS[r.algo].label} at K={r.k} is not run; the config rejects it: {r.reason}"
            )
        out += ["", stale_tables(rows, stale_k, rejected)]
    if "offline" in settings:
        out += ["", "## Offline (paper Table 2)", ""]
        out.append(
            "`algo.mode=offline` on a fixed dataset of scored base-model samples, generated "
            "once per seed (the same file for every method of that seed). "
            f"Equal steps across runs: {yes_no(equal_budgets(select_setting(rows, 'offline')))}."
        )
        for d in datasets:
            out.append(
                f"- seed {d['seed']}: `{d['path']}`: {d['rows']} samples of {d['prompts']} prompts "
                f"(group size {d['group_size']}, temperature {d['temperature']}), mean reward "
                f"{d['mean_reward']:.3f}, prompts with mixed rewards {d['mixed_groups']}, "
                f"generated in {d['seconds']:.1f} s"
            )
        out += ["", offline_table(rows)]
    out += ["", "## Every run", "", per_run_table(rows)]
    if failed:
        out += ["", "## Failed runs", ""]
        for r in failed:
            error = ANSI.sub("", str(r.get("error", "?")))
            out.append(f"- `{r['key']}`: {error} (traceback in `{r['key']}/error.txt`)")
    return "\n".join(out) + "\n"


def yes_no(flag: bool) -> str:
    """``yes``/``no``."""
    return "yes" if flag else "no"


def select_setting(
    rows: Iterable[Mapping[str, Any]], setting: str, k: int | None = None
) -> list[Mapping[str, Any]]:
    """Rows of one setting (and one K for the stale setting)."""
    return [r for r in rows if r["setting"] == setting and (k is None or r["k"] == k)]


# --------------------------------------------------------------------------- the offline dataset


def dataset_record(
    prompt_text: str, completion_text: str, reward: float, prompt_id: str, sample_id: str
) -> dict[str, Any]:
    """One scored JSONL record (the format of buffer/offline.py)."""
    return {
        "prompt": prompt_text,
        "completion": completion_text,
        "reward": float(reward),
        "prompt_id": prompt_id,
        "sample_id": sample_id,
        "task": "arith",
    }


def make_offline_dataset(cfg: Any, path: Path, seed: int, num_prompts: int) -> dict[str, Any]:
    """Sample ``group_size`` completions for ``num_prompts`` train prompts from the base model
    at the rollout temperature, score them, write scored JSONL to ``path``; returns its stats.

    Prompts come from the same seeded prompt stream an online run with ``seed`` uses, in
    batches of ``rollout.prompts_per_batch``. The prompt text is the one the rollout worker
    encodes (``encode_problems``). The completion text is the whole generated window,
    including its EOS fill (``<|eos|>``), so that it tokenises back to exactly the ids an
    online rollout row holds; this is checked for every record.
    """
    import torch

    from actors.rollout import RolloutWorker
    from embr_rl.tasks import load_task
    from embr_rl.tasks.prompts import encode_problems
    from embr_rl.tasks.stream import PromptStream

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    worker = RolloutWorker.from_config(cfg, worker_id=f"offline-seed{seed}", seed=seed)
    tok = worker.tokenizer
    stream = PromptStream(load_task(cfg.task, cfg.task.train_split), seed=seed)
    per_batch = cfg.rollout.prompts_per_batch
    records: list[dict[str, Any]] = []
    mixed = 0
    try:
        while len(records) < num_prompts * worker.group_size:
            n = min(per_batch, num_prompts - len(records) // worker.group_size)
            problems = stream.take(n)
            texts, prompt_ids = encode_problems(
                problems, tok, cfg.task.prompt_format, cfg.task.chat_template
            )
            table = worker.generate(problems).to_pylist()
            for j in range(n):
                group = table[j * worker.group_size : (j + 1) * worker.group_size]
                mixed += len({row["reward"] for row in group}) > 1
            for row in table:
                j = prompt_ids.index(row["prompt_ids"])
                completion = tok.decode(row["completion_ids"], skip_special_tokens=False)
                if tok(completion, add_special_tokens=False)["input_ids"] != row["completion_ids"]:
                    raise RuntimeError(
                        f"completion of {row['sample_id']} does not tokenise back to its ids: "
                        f"{completion!r}"
                    )
                records.append(
                    dataset_record(
                        texts[j], completion, row["reward"], row["prompt_id"], row["sample_id"]
                    )
                )
    finally:
        worker.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    stats = {
        "seed": seed,
        "path": str(path),
        "rows": len(records),
        "prompts": num_prompts,
        "group_size": worker.group_size,
        "temperature": cfg.rollout.temperature,
        "mean_reward": statistics.fmean(r["reward"] for r in records) if records else 0.0,
        "mixed_groups": mixed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path.with_suffix(".meta.json").write_text(json.dumps(stats, indent=2))
    os.replace(tmp, path)  # last: an existing dataset file always has its stats beside it
    return stats


# --------------------------------------------------------------------------- running


@dataclass
class Study:
    """Paths and choices of one study folder."""

    out: Path
    scale: str
    seeds: list[int]
    settings: list[str]
    stale_k: list[int]
    base_model: Path
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def results_path(self) -> Path:
        """``<out>/results.jsonl``."""
        return self.out / "results.jsonl"

    def dataset_path(self, seed: int) -> Path:
        """The offline dataset of ``seed``."""
        return self.out / "offline" / "data" / f"seed{seed}.jsonl"

    def description(self) -> dict[str, Any]:
        """study.json: everything the report states about the set-up."""
        return {
            "scale": self.scale,
            "scale_description": SCALES[self.scale].description,
            "scale_overrides": list(SCALES[self.scale].overrides),
            "eval_every": SCALES[self.scale].eval_every,
            "common_overrides": list(COMMON_OVERRIDES),
            "base_config": str(BASE_CONFIG.relative_to(REPO)),
            "base_model": str(self.base_model),
            "seeds": self.seeds,
            "settings": self.settings,
            "stale_k": self.stale_k,
            "methods": {
                name: {"label": m.label, "note": m.note, "overrides": list(m.overrides)}
                for name, m in METHODS.items()
            },
            "rejected": [vars(r) for r in self.rejected],
        }


def find_rejected(study: Study) -> list[Rejected]:
    """(method, K) pairs of the stale setting that the config refuses, with its message."""
    from embr_rl.config import ConfigError, load_config

    out = []
    if "stale" not in study.settings:
        return out
    for k in study.stale_k:
        for algo in ONLINE_METHODS:
            spec = RunSpec(0, "stale", k, algo)
            try:
                load_config(
                    BASE_CONFIG, run_overrides(spec, study.scale, study.out, study.base_model)
                )
            except ConfigError as exc:
                out.append(Rejected("stale", algo, k, str(exc)))
    return out


def ensure_base_model(path: Path, pretrain_if_missing: bool) -> Path:
    """The base model folder; pre-trains it (configs/demo.yaml's pretrain settings) if asked."""
    from embr_rl.pretrain import is_trained

    if is_trained(path):
        return path.resolve()
    if not pretrain_if_missing:
        raise SystemExit(
            f"no base model at {path}: run `make demo` first (it pre-trains and caches it under "
            "runs/demo/base_model), or pass --pretrain to pre-train it here"
        )
    from embr_rl.config import load_config
    from embr_rl.pretrain import pretrain

    if path.name != "base_model":
        raise SystemExit(f"--pretrain writes <dir>/base_model; {path} is not named base_model")
    cfg = load_config(
        BASE_CONFIG, [f"logging.run_dir={path.parent}", "pretrain.output_dir=base_model"]
    )
    return pretrain(cfg).resolve()


def short_error(exc: BaseException) -> str:
    """The first line of ``exc``'s message, without terminal colour codes, at most 300 chars."""
    text = ANSI.sub("", f"{type(exc).__name__}: {exc}").strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete checkpoint (``checkpoint.resume=auto`` continues)."""
    return any((run_dir / "checkpoints").glob("step_*/state.json"))


def release_actors(timeout_s: float = 120.0) -> bool:
    """Free the finished run's actors before the next run starts; True once the cluster is idle.

    ``embr_rl.run.run`` leaves its actor handles in a reference cycle (the data source holds
    the fleet, and its bound ``receiver_failed`` is held by the ``SyncManager`` it holds),
    so they outlive the call until Python's cycle collector runs; their CPU reservations
    then keep the next run's learner placement group from being scheduled. Collect now and
    wait until every CPU of the cluster is available again.
    """
    import ray

    gc.collect()
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= total - 1e-6:
            return True
        time.sleep(0.5)
    print(f"[repro] warning: the cluster still has busy CPUs after {timeout_s:.0f}s", flush=True)
    return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def execute(study: Study, specs: Sequence[RunSpec]) -> tuple[int, int, int | None]:
    """Run every spec not finished yet; returns (executed, skipped, stop signal or None)."""
    import ray

    from embr_rl.config import load_config
    from embr_rl.run import run
    from embr_rl.telemetry import read_jsonl

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    known = {r["key"]: r for r in read_results(study.results_path)}
    datasets: dict[int, Path] = {}
    executed = skipped = 0
    for i, spec in enumerate(specs, start=1):
        run_dir = spec.run_dir(study.out)
        offline = None
        if spec.setting == "offline":
            offline = study.dataset_path(spec.seed)
        overrides = run_overrides(spec, study.scale, study.out, study.base_model, offline)
        cfg = load_config(BASE_CONFIG, overrides)
        total = cfg.learner.total_steps
        summary = _read_json(run_dir / "summary.json")
        if is_finished(summary, total):
            skipped += 1
            if spec.key not in known or known[spec.key].get("status") != "done":
                assert summary is not None
                row = result_row(
                    spec, summary, read_jsonl(run_dir / "metrics.jsonl"),
                    scale=study.scale, total_steps=total, wall_measured=None,
                )  # fmt: skip
                append_jsonl(study.results_path, row)
            print(f"[repro] {i}/{len(specs)} {spec.key}: finished before, skipped", flush=True)
            continue
        if offline is not None and spec.seed not in datasets:
            if not offline.is_file():
                r = cfg.rollout
                prompts = total * r.num_workers * r.prompts_per_batch
                print(
                    f"[repro] offline dataset for seed {spec.seed}: {prompts} prompts", flush=True
                )
                make_offline_dataset(cfg, offline, spec.seed, prompts)
            datasets[spec.seed] = offline
        if run_dir.exists() and not has_checkpoint(run_dir):
            shutil.rmtree(run_dir)  # an attempt that left nothing to resume from
        print(f"[repro] {i}/{len(specs)} {spec.key}: running", flush=True)
        t0 = time.perf_counter()
        summary = None
        try:
            summary = run(cfg)
        except Exception as exc:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
            traceback.print_exc()
            append_jsonl(
                study.results_path,
                {
                    "key": spec.key, "setting": spec.setting, "k": spec.k, "algo": spec.algo,
                    "seed": spec.seed, "scale": study.scale, "status": "failed",
                    "error": short_error(exc),
                    "wall_measured": round(time.perf_counter() - t0, 1),
                },
            )  # fmt: skip
        wall = time.perf_counter() - t0
        executed += 1
        release_actors()  # outside the except block, which still references the run's frames
        if summary is None:
            continue
        if summary.get("stopped_by"):
            print(f"[repro] {spec.key} stopped by signal; rerun to resume", flush=True)
            return executed, skipped, int(summary["stopped_by"])
        row = result_row(
            spec, summary, read_jsonl(run_dir / "metrics.jsonl"),
            scale=study.scale, total_steps=total, wall_measured=wall,
        )  # fmt: skip
        append_jsonl(study.results_path, row)
        print(
            f"[repro] {spec.key}: accuracy {row['acc_before']} -> {row['acc_after']}, {wall:.1f}s",
            flush=True,
        )
    return executed, skipped, None


def write_report(out: Path, report_command: str | None = None) -> tuple[Path, Path]:
    """Rebuild ``<out>/report.md`` and ``<out>/reward_curves.png`` from the study's files."""
    study = _read_json(out / "study.json")
    if study is None:
        raise SystemExit(f"{out / 'study.json'} not found: run the study first")
    rows = read_results(out / "results.jsonl")
    invocations = [
        json.loads(line)
        for line in (out / "invocations.jsonl").read_text().splitlines()
        if line.strip()
    ] if (out / "invocations.jsonl").is_file() else []  # fmt: skip
    datasets = []
    for seed in study.get("seeds", []):
        meta = _read_json(out / "offline" / "data" / f"seed{seed}.meta.json")
        if meta is not None:
            datasets.append(meta)
    png = plot_curves(rows, out / "reward_curves.png")
    report = out / "report.md"
    report.write_text(build_report(rows, study, invocations, datasets, report_command))
    return report, png


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "repro")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for the study)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="online,stale,offline")
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--stale-k", default=",".join(map(str, DEFAULT_STALE_K)))
    p.add_argument(
        "--methods", default=",".join(METHODS), help="run only these algorithms (e.g. a timing)"
    )
    p.add_argument("--base-model", type=Path, default=DEFAULT_BASE_MODEL)
    p.add_argument("--pretrain", action="store_true", help="pre-train the base model if missing")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and the PNG")
    return p.parse_args(argv)


def command_line() -> str:
    """The command as it was typed (interpreter included)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def prepare_environment() -> None:
    """One thread per process unless told otherwise, and the repository importable here and
    in Ray's workers (run as ``bench/repro.py``, the root is not on the path; workers
    inherit ``PYTHONPATH``)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study (or only rebuild its report); exit status 0 when every run finished."""
    prepare_environment()
    args = parse_args(argv)
    out = args.out.resolve()
    if args.report_only:
        report, png = write_report(out, command_line())
        print(f"[repro] {report}\n[repro] {png}")
        return 0
    try:
        seeds = parse_ints(args.seeds)
        settings = parse_list(args.settings, SETTINGS)
        stale_k = parse_ints(args.stale_k)
        methods = parse_list(args.methods, METHODS)
    except ValueError as exc:
        print(f"repro: {exc}", file=sys.stderr)
        return 2
    previous = _read_json(out / "study.json")
    if previous is not None and previous.get("scale") != args.scale:
        print(
            f"repro: {out} holds a study at scale {previous.get('scale')!r}; use another --out "
            f"for scale {args.scale!r}",
            file=sys.stderr,
        )
        return 2
    base = ensure_base_model(args.base_model, args.pretrain)
    study = Study(out, args.scale, seeds, settings, stale_k, base)
    if previous is not None:  # the report covers every seed and setting run so far
        study.seeds = sorted(set(previous.get("seeds", [])) | set(seeds))
        study.settings = [
            s for s in SETTINGS if s in set(previous.get("settings", [])) | set(settings)
        ]
        study.stale_k = sorted(set(previous.get("stale_k", [])) | set(stale_k))
    out.mkdir(parents=True, exist_ok=True)
    study.rejected = find_rejected(study)
    (out / "study.json").write_text(json.dumps(study.description(), indent=2))
    refused = {(r.algo, r.k) for r in study.rejected}
    specs = [
        s
        for s in plan_runs(seeds, settings, stale_k)
        if not (s.setting == "stale" and (s.algo, s.k) in refused) and s.algo in methods
    ]
    print(f"[repro] {len(specs)} runs at scale {args.scale} into {out}", flush=True)
    for r in study.rejected:
        print(f"[repro] not run: {r.algo} at K={r.k}: {r.reason}", flush=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    executed, skipped, stopped = execute(study, specs)
    append_jsonl(
        out / "invocations.jsonl",
        {
            "command": command_line(),
            "started": started,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "runs_executed": executed,
            "runs_skipped": skipped,
            "stopped_by": stopped,
        },
    )
    report, png = write_report(out)
    print(f"[repro] report {report}\n[repro] reward curves {png}", flush=True)
    if stopped:
        return 128 + stopped
    rows = {r["key"]: r for r in read_results(study.results_path)}
    return 0 if all(rows.get(s.key, {}).get("status") == "done" for s in specs) else 1


if __name__ == "__main__":
    sys.exit(main())
