"""The reproduction study: every online method at its own tuned settings, several seeds.

::

    .venv/bin/python bench/sweep.py --out bench/records/sweep # first: bench/tuned.json
    .venv/bin/python bench/repro.py --out bench/records/repro [--seeds 0,1,2,3,4] [--steps 80] \\
        [--settings online,stale,offline] [--stale-k 2] [--offline-rounds 32] [--write-docs]
    .venv/bin/python bench/repro.py --out bench/records/repro --report-only [--write-docs]

Every run is Algorithm 1 in sync mode in one process (``bench/localrun.py``, no Ray) on the
demo task from the shipped base model: ``--steps`` learner steps of 128 rows (16 prompts x 8
completions), each method with the overrides the validation sweep chose for it
(``bench/tuned.json``; the report lists each method's sweep points), evaluated greedily on the
500 test problems every ``--eval-every`` steps. The base model is evaluated once.

- ``online`` (paper Table 1): EMBR-E, EMBR-C, EMBR-U, d1 (diffu-GRPO), wd1, UniGRPO, SPG, BGPO, a
  fresh batch per step.
- ``stale`` (the off-policy claim): each batch reused for ``K + 1`` updates
  (``algo.inner_iterations``), so the last update trains on samples ``K`` versions old.
  EMBR-C (the demo's method) runs without importance weights; d1 runs with ratios to the behaviour policy's
  per-token log-probabilities recorded at rollout time (``rollout.record_logprobs``).
- ``offline`` (paper Table 2): EMBR-C, EMBR-U, DPO-ELBO and VRPO (``algo.mode=offline``) on
  one fixed dataset, ``--offline-rounds`` rounds of the base model's scored rollouts made
  once into ``<out>/offline_base.jsonl``; the learner never sees a fresh sample.

Records go to ``<out>/results.jsonl`` (a finished key is skipped, so the study resumes); the
report (``<out>/report.md``, ``<out>/curves.png``) is built from that file alone: final
accuracy with 95% t-intervals over seeds, accuracy against samples, samples-to-target (the
samples a method needs to reach the best baseline's final mean accuracy), and each of the
paper's claims marked held, not held, or not resolved at this power. ``--write-docs`` puts
the report into docs/results.md between its ``repro:begin``/``repro:end`` markers and the
curves into docs/img/repro_curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.localrun import (
    OFFLINE_ROUNDS,
    RECORDS,
    REPO,
    Changed,
    Job,
    changed_records,
    done_keys,
    make_offline_dataset,
    markers,
    offline_overrides,
    read_records,
    retire_changed,
    retire_keys,
    run_many,
    write_block,
)
from embr_rl.core.losses import LOSS_TRAITS

TUNED = REPO / "bench" / "tuned.json"
# Long enough for the best methods to plateau (bench/plateau.py); the demo runs as long.
DEFAULT_STEPS = 80
DOCS = REPO / "docs" / "results.md"
DOCS_IMG = REPO / "docs" / "img" / "repro_curves.png"
BEGIN, END = markers("repro")

LABELS = {
    "embr_e": "EMBR-E",
    "embr_c": "EMBR-C",
    "embr_u": "EMBR-U",
    "d1": "d1 (diffu-GRPO)",
    "wd1": "wd1",
    "unigrpo": "UniGRPO",
    "spg": "SPG (mixture)",
    "bgpo": "BGPO (our reading)",
    "dpo": "DPO-ELBO",
    "vrpo": "VRPO",
}
# The online study: every registered loss that is not a preference (pairs-only) objective.
EMBR = tuple(n for n, t in LOSS_TRAITS.items() if t.family == "embr")
BASELINES = tuple(n for n, t in LOSS_TRAITS.items() if t.family == "policy_gradient")
ONLINE = EMBR + BASELINES
# The stale setting: d1 needs the behaviour log-probs for its ratios; EMBR needs nothing.
# The claim tests the EMBR variant the validation sweep ranks first among those run here.
STALE: dict[str, tuple[str, ...]] = {
    "embr_c": (),
    "embr_e": (),
    "d1": ("rollout.record_logprobs=true",),
}
# The offline setting (the paper's Table 2 claim): one fixed dataset of the base model's
# scored samples, no rollouts; EMBR against the preference objectives on the same rows.
OFFLINE = ("embr_c", "embr_u", "dpo", "vrpo")
# The offline settings come from `bench/sweep.py --setting offline` (bench/tuned_offline.json,
# the same points for each offline method); without that file an EMBR variant takes its
# online settings and DPO/VRPO this learning rate.
TUNED_OFFLINE = REPO / "bench" / "tuned_offline.json"
OFFLINE_UNTUNED: tuple[str, ...] = ("learner.lr=1.0e-4",)
OFFLINE_DATA = "offline_base.jsonl"
SETTINGS = ("online", "stale", "offline")

# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); larger: 1.96.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# --------------------------------------------------------------------------- the plan


def tuned_overrides(algo: str, tuned: Mapping[str, Any]) -> list[str]:
    """The sweep's overrides for ``algo``; raises naming the command that makes them."""
    if algo not in tuned:
        raise KeyError(
            f"{TUNED.name} has no settings for {algo!r}; run "
            f"`.venv/bin/python bench/sweep.py --algos {algo}` first (or pass --untuned)"
        )
    return list(tuned[algo]["overrides"])


def offline_settings(
    algo: str, tuned: Mapping[str, Any] | None, tuned_offline: Mapping[str, Any] | None
) -> list[str]:
    """An offline method's overrides: the offline sweep's, else its online ones, else
    :data:`OFFLINE_UNTUNED`; ``tuned`` None (``--untuned``): the defaults."""
    if tuned is None:
        return []
    if tuned_offline and algo in tuned_offline:
        return list(tuned_offline[algo]["overrides"])
    return list(tuned[algo]["overrides"]) if algo in tuned else list(OFFLINE_UNTUNED)


def _offline_jobs(
    seed: int,
    steps: int,
    eval_every: int,
    data: Path,
    rows: int,
    settings_of: Callable[[str], list[str]],
) -> list[Job]:
    """The offline runs of one seed: every :data:`OFFLINE` method on the dataset ``data``."""
    return [
        Job(
            f"offline/{a}/seed{seed}",
            (
                f"algo.name={a}",
                *settings_of(a),
                *offline_overrides(data, rows),
                f"seed={seed}",
            ),
            steps,
            "test",
            eval_points(steps, eval_every, 1),
            meta={"setting": "offline", "algo": a, "seed": seed, "k": 0},
        )
        for a in OFFLINE
    ]


def eval_points(steps: int, every: int, round_len: int) -> tuple[int, ...]:
    """Evaluation steps: every ``every`` steps rounded down to whole rounds, and the last step."""
    every = max(round_len, every // round_len * round_len)
    points = set(range(every, steps + 1, every)) | {steps}
    return tuple(sorted(points))


def plan(
    seeds: Sequence[int],
    settings: Sequence[str],
    *,
    steps: int,
    eval_every: int,
    stale_k: Sequence[int],
    tuned: Mapping[str, Any] | None,
    algos: Sequence[str] = ONLINE,
    offline_data: Path | None = None,
    offline_rows: int = 0,
    tuned_offline: Mapping[str, Any] | None = None,
) -> list[Job]:
    """The base-model evaluation, then every run, seed-major (an interrupted study holds whole
    seeds); the online setting runs ``algos``, the offline one :data:`OFFLINE` on
    ``offline_data`` (``offline_rows`` rows) at ``tuned_offline``'s settings where it has
    them. ``tuned`` None: every method at the schema defaults of configs/demo.yaml."""

    def settings_of(algo: str) -> list[str]:
        return [] if tuned is None else tuned_overrides(algo, tuned)

    def offline_of(algo: str) -> list[str]:
        return offline_settings(algo, tuned, tuned_offline)

    jobs = [Job("base", ("seed=0",), 0, "test", (0,), meta={"setting": "base"})]
    for seed in seeds:
        if "online" in settings:
            for a in algos:
                jobs.append(
                    Job(
                        f"online/{a}/seed{seed}",
                        (f"algo.name={a}", *settings_of(a), f"seed={seed}"),
                        steps,
                        "test",
                        eval_points(steps, eval_every, 1),
                        meta={"setting": "online", "algo": a, "seed": seed, "k": 0},
                    )
                )
        if "stale" in settings:
            for k in stale_k:
                rounds = steps // (k + 1) * (k + 1)
                for a, extra in STALE.items():
                    jobs.append(
                        Job(
                            f"stale/K{k}/{a}/seed{seed}",
                            (
                                f"algo.name={a}",
                                *settings_of(a),
                                f"algo.inner_iterations={k + 1}",
                                *extra,
                                f"seed={seed}",
                            ),
                            rounds,
                            "test",
                            eval_points(rounds, eval_every, k + 1),
                            meta={"setting": "stale", "algo": a, "seed": seed, "k": k},
                        )
                    )
        if "offline" in settings:
            if offline_data is None:
                raise ValueError("the offline setting needs offline_data")
            jobs += _offline_jobs(seed, steps, eval_every, offline_data, offline_rows, offline_of)
    return jobs


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided 95% t-interval ``[lo, hi]`` (n = 1: no interval)."""

    mean: float
    lo: float
    hi: float
    n: int


def t_interval(values: Sequence[float]) -> Interval:
    """``mean +- t_{0.975, n-1} s / sqrt(n)``."""
    if not values:
        raise ValueError("no values")
    m = statistics.fmean(values)
    if len(values) < 2:
        return Interval(m, math.nan, math.nan, 1)
    df = len(values) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(m, m - half, m + half, len(values))


def fmt(iv: Interval, *, scale: float = 100.0, signed: bool = False) -> str:
    """``33.0 [30.1, 35.9]`` (percent points by default)."""
    sign = "+" if signed else ""
    if iv.n < 2:
        return f"{iv.mean * scale:{sign}.1f}"
    return f"{iv.mean * scale:{sign}.1f} [{iv.lo * scale:{sign}.1f}, {iv.hi * scale:{sign}.1f}]"


def samples_to_target(
    curve: Sequence[tuple[int, float]], target: float, base: float
) -> float | None:
    """Samples at which the accuracy curve ``[(samples, accuracy)]`` (starting from ``base`` at
    0 samples) first reaches ``target``, linearly interpolated; None if it never does."""
    prev_s, prev_a = 0, base
    if base >= target:
        return 0.0
    for s, a in curve:
        if a >= target:
            return prev_s + (target - prev_a) / (a - prev_a) * (s - prev_s)
        prev_s, prev_a = s, a
    return None


def verdict(diff: Interval) -> str:
    """``held`` when the 95% interval of the difference lies wholly above 0, ``not held``
    when wholly below, else ``not resolved at this power``."""
    if diff.n < 2:
        return "not measurable (one seed)"
    lo, hi = diff.lo, diff.hi
    if lo > 0:
        return "held"
    if hi < 0:
        return "not held"
    return "not resolved at this power"


# --------------------------------------------------------------------------- the report


def _runs(records: Sequence[Mapping[str, Any]], setting: str, algo: str, k: int = 0) -> list:
    return sorted(
        (
            r
            for r in records
            if r.get("setting") == setting and r.get("algo") == algo and r.get("k", 0) == k
        ),
        key=lambda r: r["seed"],
    )


def _final(runs: Sequence[Mapping[str, Any]]) -> list[float]:
    return [float(r["final_accuracy"]) for r in runs]


def _paired_diff(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> Interval:
    """Per-seed differences of final accuracy (seeds present in both)."""
    fa = {r["seed"]: r["final_accuracy"] for r in a}
    fb = {r["seed"]: r["final_accuracy"] for r in b}
    common = sorted(set(fa) & set(fb))
    if not common:
        return Interval(math.nan, math.nan, math.nan, 0)
    return t_interval([fa[s] - fb[s] for s in common])


def mean_curve(runs: Sequence[Mapping[str, Any]], x: str = "samples") -> list[tuple[int, float]]:
    """Mean accuracy over seeds at each evaluated sample count (or ``x="step"``: learner step)
    all runs share."""
    if not runs:
        return []
    points = [{e[x]: e["accuracy"] for e in r["evals"]} for r in runs]
    shared = sorted(set.intersection(*(set(p) for p in points)))
    return [(s, statistics.fmean(p[s] for p in points)) for s in shared]


def plot(records: Sequence[Mapping[str, Any]], base: float, path: Path) -> Path:
    """Accuracy against samples, mean over seeds with the 95% band, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in records if r.get("setting") == "stale"})
    panels = [("online", 0, ONLINE)] + [("stale", k, tuple(STALE)) for k in ks]
    if any(r.get("setting") == "offline" for r in records):
        panels.append(("offline", 0, OFFLINE))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (setting, k, algos) in zip(axes[0], panels, strict=True):
        for a in algos:
            runs = _runs(records, setting, a, k)
            if not runs:
                continue
            x = "step" if setting == "offline" else "samples"
            xs = [0] + [s for s, _ in mean_curve(runs, x)]
            per_point = [
                t_interval([next(e["accuracy"] for e in r["evals"] if e[x] == s) for r in runs])
                for s in xs[1:]
            ]
            ys = [base] + [iv.mean for iv in per_point]
            (line,) = ax.plot(xs, [100 * y for y in ys], marker="o", label=LABELS[a])
            if len(runs) > 1:
                ax.fill_between(
                    xs,
                    [100 * base] + [100 * iv.lo for iv in per_point],
                    [100 * base] + [100 * iv.hi for iv in per_point],
                    color=line.get_color(),
                    alpha=0.15,
                )
        title = {"online": "online", "offline": "offline: one fixed dataset"}.get(
            setting, f"stale: each batch reused, K = {k}"
        )
        xlabel = "learner steps (128 rows)" if setting == "offline" else "samples generated"
        ax.set(title=title, xlabel=xlabel, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def offline_rows(offline: Mapping[str, Sequence[Mapping[str, Any]]]) -> int:
    """The offline dataset's size (an offline run's ``samples``)."""
    return int(next(iter(offline.values()))[0]["samples"])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def chosen_embr(
    present: Sequence[str], tuned: Mapping[str, Any] | None, sweep: str = "validation sweep"
) -> tuple[str, str]:
    """The EMBR variant the claims test, and why: the one the validation sweep ranks first
    (``validation_accuracy`` in ``tuned``), never the one with the best test mean; without
    validation figures for every variant, EMBR-C."""
    scored = [a for a in present if tuned and "validation_accuracy" in tuned.get(a, {})]
    if tuned and scored and len(scored) == len(present):
        pick = max(scored, key=lambda a: float(tuned[a]["validation_accuracy"]))
        return pick, f"the EMBR variant the {sweep} ranks first"
    pick = "embr_c" if "embr_c" in present else present[0]
    return pick, "EMBR-C (no validation figure for every variant)"


def _grouped_by_seed(changed: Sequence[Changed]) -> list[str]:
    """One bullet per run family and change, its seeds merged."""
    groups: dict[tuple[str, str], list[str]] = {}
    for c in changed:
        family, _, seed = c.key.rpartition("/seed")
        groups.setdefault((family or c.key, c.change()), []).append(seed)
    return [
        f"- `{fam}` (seeds {', '.join(seeds)}): `{change.replace(' -> ', '` -> `')}`"
        for (fam, change), seeds in groups.items()
    ]


def build_report(  # noqa: C901, PLR0912, PLR0915  (report assembly, one table after another)
    records: Sequence[Mapping[str, Any]],
    tuned: Mapping[str, Any] | None,
    commands: Sequence[Mapping[str, Any]],
    *,
    image: str = "curves.png",
    sweep_points: Mapping[str, int] | None = None,
    earlier: Sequence[Changed] = (),
    tuned_offline: Mapping[str, Any] | None = None,
) -> str:
    """The study's markdown, from the records alone (``sweep_points``: each method's points in
    the sweep's records, its tuning budget; ``earlier``: the records run at settings other
    than the plan's now, as :func:`bench.localrun.changed_records` lists them;
    ``tuned_offline``: the offline sweep's choices, when it ran)."""
    base_rec = next((r for r in records if r.get("setting") == "base"), None)
    if base_rec is None:
        raise ValueError("no base-model evaluation in the records")
    base = float(base_rec["final_accuracy"])
    online = {a: _runs(records, "online", a) for a in ONLINE}
    online = {a: r for a, r in online.items() if r}
    if not online:
        raise ValueError("no finished online runs in the records")
    any_run = next(iter(online.values()))[0]
    seeds = sorted({r["seed"] for runs in online.values() for r in runs})
    lines = [
        f"Demo task, shipped base model (test accuracy {100 * base:.1f}%, greedy, 500 test "
        f"problems); {any_run['steps']} learner steps of {any_run['rows_per_round']} rows per "
        f"run ({any_run['samples']} samples), seeds {', '.join(map(str, seeds))}; each method "
        "at the settings the validation sweep chose for it (its sweep points in the table "
        "below). "
        "Intervals are two-sided 95% t-intervals over seeds.",
        "",
        "### Settings per method (from the validation sweep, `bench/tuned.json`)",
        "",
    ]
    lines.append(
        _table(
            [
                "method",
                "overrides of configs/demo.yaml",
                "validation accuracy in the sweep",
                "sweep points on record",
            ],
            [
                [
                    LABELS[a],
                    "`" + " ".join(tuned[a]["overrides"]) + "`"
                    if tuned and a in tuned
                    else "defaults",
                    f"{100 * tuned[a]['validation_accuracy']:.1f}%"
                    if tuned and a in tuned
                    else "-",
                    str(sweep_points[a])
                    if sweep_points and sweep_points.get(a)
                    else "none (not on record)",
                ]
                for a in online
            ],
        )
    )

    def mixed(setting: str) -> str:
        """A warning for a claim whose ``setting`` runs include records at earlier settings."""
        if any(e.key.startswith(f"{setting}/") for e in earlier):
            return f" (its {setting} runs are at earlier settings, listed above)"
        return ""

    if earlier:
        lines += [
            "",
            f"**Runs at earlier settings.** {len(earlier)} records were run before "
            "`bench/tuned.json` (or `bench/tuned_offline.json`) last changed and have not been rerun; their tables and the "
            "claims that use them mix those settings with the ones above (recorded -> "
            "planned now):",
            "",
            *_grouped_by_seed(earlier),
        ]
    lines += ["", "### Online: final test accuracy", ""]
    finals = {a: t_interval(_final(r)) for a, r in online.items()}
    lines.append(
        _table(
            ["method", "runs", "final accuracy (%)", "gain over base (points)", "per seed (%)"],
            [
                [
                    LABELS[a],
                    str(len(r)),
                    fmt(finals[a]),
                    fmt(t_interval([x - base for x in _final(r)]), signed=True),
                    ", ".join(f"{100 * x:.1f}" for x in _final(r)),
                ]
                for a, r in online.items()
            ],
        )
    )
    lines += ["", f"![accuracy against samples]({image})", ""]
    # Samples-to-target: the best baseline's final mean accuracy.
    present_baselines = [a for a in BASELINES if a in online]
    lines += ["### Samples to target", ""]
    if present_baselines:
        best_b = max(present_baselines, key=lambda a: finals[a].mean)
        target = finals[best_b].mean
        lines.append(
            f"Target: the best baseline's final mean accuracy, {LABELS[best_b]} "
            f"{100 * target:.1f}%. Samples until a run's accuracy curve first reaches it "
            "(linear between evaluations; 'not reached' within the run's budget):"
        )
        lines.append("")
        rows = []
        for a, runs in online.items():
            per = [
                samples_to_target([(e["samples"], e["accuracy"]) for e in r["evals"]], target, base)
                for r in runs
            ]
            reached = [p for p in per if p is not None]
            rows.append(
                [
                    LABELS[a],
                    f"{len(reached)}/{len(per)}",
                    f"{statistics.median(reached):.0f}" if reached else "not reached",
                    ", ".join("-" if p is None else f"{p:.0f}" for p in per),
                ]
            )
        lines.append(_table(["method", "runs reaching it", "median samples", "per seed"], rows))
    else:
        lines.append("No baseline ran, so there is no target.")
    # Stale.
    stale_ks = sorted({r["k"] for r in records if r.get("setting") == "stale"})
    if stale_ks:
        lines += ["", "### Stale data: each batch reused for K + 1 updates", ""]
        rows = []
        for k in stale_ks:
            for a in STALE:
                runs = _runs(records, "stale", a, k)
                if not runs:
                    continue
                drop = _paired_diff(runs, online.get(a, []))
                rows.append(
                    [
                        LABELS[a],
                        str(k),
                        "behaviour log-probs" if a == "d1" else "none",
                        str(len(runs)),
                        fmt(t_interval(_final(runs))),
                        fmt(drop, signed=True) if drop.n else "-",
                        f"{runs[0]['samples']}",
                    ]
                )
        lines.append(
            _table(
                [
                    "method",
                    "K",
                    "importance weights",
                    "runs",
                    "final accuracy (%)",
                    "vs. online, same seed (points)",
                    "samples",
                ],
                rows,
            )
        )
    offline = {a: _runs(records, "offline", a) for a in OFFLINE}
    offline = {a: r for a, r in offline.items() if r}
    if offline:
        lines += [
            "",
            "### Offline: one fixed dataset of the base model's samples",
            "",
            f"{offline_rows(offline)} scored rows ({OFFLINE_DATA}: the base model's rollouts, "
            "16 prompts x 8 completions per round), no rollouts during training; the same "
            "learner steps as online. "
            + (
                "Each method at the settings the offline validation sweep chose for it "
                "(`bench/sweep.py --setting offline`, `bench/tuned_offline.json`: the same "
                "points for each):"
                if tuned_offline
                else "EMBR-C and EMBR-U at their online settings; DPO-ELBO and VRPO at "
                f"`{' '.join(OFFLINE_UNTUNED)}` (no offline sweep on record)."
            ),
            "",
        ]
        if tuned_offline:
            lines += [
                _table(
                    ["method", "overrides", "validation accuracy in the offline sweep"],
                    [
                        [
                            LABELS[a],
                            "`" + " ".join(tuned_offline[a]["overrides"]) + "`",
                            f"{100 * tuned_offline[a]['validation_accuracy']:.1f}%",
                        ]
                        for a in offline
                        if a in tuned_offline
                    ],
                ),
                "",
            ]
        lines.append(
            _table(
                ["method", "runs", "final accuracy (%)", "gain over base (points)", "per seed (%)"],
                [
                    [
                        LABELS[a],
                        str(len(r)),
                        fmt(t_interval(_final(r))),
                        fmt(t_interval([x - base for x in _final(r)]), signed=True),
                        ", ".join(f"{100 * x:.1f}" for x in _final(r)),
                    ]
                    for a, r in offline.items()
                ],
            )
        )
    # Claims.
    lines += ["", "### The paper's claims", ""]
    claims = []
    embr_present = [a for a in EMBR if a in online]
    if embr_present and present_baselines:
        pick, why = chosen_embr(embr_present, tuned)
        for b in present_baselines:
            d = _paired_diff(online[pick], online[b])
            claims.append(
                f"- **EMBR >= {LABELS[b]} online** ({LABELS[pick]}, {why}, "
                f"minus {LABELS[b]}: {fmt(d, signed=True)} points): {verdict(d)}"
                f"{mixed('online')}."
            )
        best_e = max(embr_present, key=lambda a: finals[a].mean)
        if best_e != pick:
            post_hoc = ", ".join(
                f"{LABELS[b]} {fmt(_paired_diff(online[best_e], online[b]), signed=True)}"
                for b in present_baselines
            )
            claims.append(
                f"- Not a test, for reference: {LABELS[best_e]}, the EMBR variant with the best "
                f"test mean (chosen after seeing the test results), minus each baseline: "
                f"{post_hoc} points."
            )
    for hi, lo in (("embr_u", "embr_c"), ("embr_c", "embr_e")):
        if hi in online and lo in online:
            d = _paired_diff(online[hi], online[lo])
            claims.append(
                f"- **{LABELS[hi]} >= {LABELS[lo]}** ({fmt(d, signed=True)} points): {verdict(d)}"
                f"{mixed('online')}."
            )
    off_embr = [a for a in EMBR if a in offline]
    off_pref = [a for a in ("dpo", "vrpo") if a in offline]
    if off_embr and off_pref:
        off_final = {a: t_interval(_final(r)) for a, r in offline.items()}
        pick, why = (
            chosen_embr(off_embr, tuned_offline, "offline validation sweep")
            if tuned_offline
            else chosen_embr(off_embr, tuned)
        )
        best_p = max(off_pref, key=lambda a: off_final[a].mean)
        d = _paired_diff(offline[pick], offline[best_p])
        claims.append(
            f"- **EMBR > DPO/VRPO offline** ({LABELS[pick]}, {why}, "
            f"minus {LABELS[best_p]}, the preference objective with the better test mean: "
            f"{fmt(d, signed=True)} points): {verdict(d)}{mixed('offline')}."
        )
    else:
        claims.append(
            "- **EMBR > DPO/VRPO offline**: not measurable here; the offline setting was not "
            "run in this study."
        )
    for k in stale_ks:
        d_runs = _runs(records, "stale", "d1", k)
        stale_embr = [
            a for a in EMBR if a in STALE and a in online and _runs(records, "stale", a, k)
        ]
        if not (d_runs and stale_embr):
            continue
        pick, why = chosen_embr(stale_embr, tuned)
        c_runs = _runs(records, "stale", pick, k)
        c_drop = _paired_diff(c_runs, online[pick])
        d = _paired_diff(c_runs, d_runs)
        loss = (
            "no significant loss at this power"
            if c_drop.n > 1 and c_drop.lo <= 0 <= c_drop.hi
            else verdict(c_drop)
        )
        claims.append(
            f"- **EMBR tolerates stale data where d1 needs ratios** (K = {k}; {LABELS[pick]}, "
            f"{why} of those run stale): {LABELS[pick]} with no weights vs. its online runs "
            f"{fmt(c_drop, signed=True)} points ({loss}); {LABELS[pick]} minus d1-with-ratios "
            f"at K = {k}: {fmt(d, signed=True)} points: {verdict(d)}{mixed('stale')}."
        )
    lines += claims
    lines += ["", "### Commands", ""]
    for c in commands:
        cut = f", interrupted after {c.get('runs', '?')} runs" if c.get("interrupted") else ""
        lines.append(f"- `{c['command']}` (started {c['started']}, {c['seconds']:.0f} s{cut})")
    total = sum(float(r.get("seconds", 0)) for r in records)
    lines.append(f"- process time of all {len(records)} records: {total / 60:.0f} min")
    return "\n".join(lines) + "\n"


def write_docs(
    report: str, curves: Path, docs: Path = DOCS, img: Path = DOCS_IMG, block: str = "repro"
) -> None:
    """Replace the text between the markers ``block`` of ``docs`` with ``report``; copy the curves."""
    body = report.replace("](curves.png)", f"](img/{img.name})")
    write_block(docs, *markers(block), body)
    img.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(curves, img)


# --------------------------------------------------------------------------- main


def sweep_points(path: Path = RECORDS / "sweep" / "sweep.jsonl") -> dict[str, int]:
    """Each online method's finished points in the sweep's records (its tuning budget)."""
    swept = read_records(path)
    return {a: sum(r.get("algo") == a for r in swept) for a in ONLINE}


def run_logged(
    jobs: Sequence[Job], path: Path, log_path: Path, command: str, *, processes: int
) -> int:
    """Run ``jobs`` into ``path`` and append ``command`` to ``log_path`` with its start, wall
    time and the records it added, also when it is cut short (``"interrupted": true``); a
    command that added no record (a report, a finished study) is not logged. Returns the count."""
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.time()
    before, interrupted = len(done_keys(path)), True
    try:
        run_many(jobs, path, processes=processes)
        interrupted = False
    finally:
        ran = len(done_keys(path)) - before
        if ran:
            entry: dict[str, Any] = {"command": command, "started": started, "runs": ran}
            entry["seconds"] = time.time() - t0
            if interrupted:
                entry["interrupted"] = True
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
    return ran


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=RECORDS / "repro")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--settings", default="online,stale,offline")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--stale-k", default="2")
    p.add_argument(
        "--offline-rounds",
        type=int,
        default=OFFLINE_ROUNDS,
        help="rounds of 128 base-model rows in the offline dataset (made once, kept in --out)",
    )
    p.add_argument("--processes", type=int, default=2)
    p.add_argument(
        "--algos", default=",".join(ONLINE), help="the online setting's methods (comma-separated)"
    )
    p.add_argument("--untuned", action="store_true", help="every method at the demo's defaults")
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="move records run at settings other than the plan's to results.retired.jsonl "
        "and run them again (without it such records stop the study)",
    )
    p.add_argument(
        "--rerun",
        default="",
        help="comma-separated key prefixes (e.g. online/embr_e/): move the planned runs' "
        "records under them to results.retired.jsonl and run them again, after a code change "
        "their overrides cannot show",
    )
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument(
        "--block",
        default="repro",
        help="docs/results.md's markers for --write-docs (<!-- BLOCK:begin -->); the curves go "
        "to docs/img/BLOCK_curves.png",
    )
    return p


def _lists(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], list[int], list[int], list[str]]:
    """``--algos``, ``--seeds``, ``--stale-k`` and ``--settings`` checked, as lists."""
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    bad_algos = [a for a in algos if a not in ONLINE]
    if bad_algos or not algos:
        p.error(
            f"unknown method {bad_algos[0] if bad_algos else ''!r} in --algos; allowed: "
            f"{', '.join(ONLINE)}"
        )
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        stale_k = [int(s) for s in args.stale_k.split(",") if s.strip()]
    except ValueError:
        p.error(
            f"--seeds and --stale-k take comma-separated integers, got {args.seeds!r}, {args.stale_k!r}"
        )
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        p.error(f"unknown setting {bad[0] if bad else ''!r}; allowed: {', '.join(SETTINGS)}")
    if any(k < 1 for k in stale_k):
        p.error("--stale-k values must be >= 1 (K = 0 is the online setting)")
    return algos, seeds, stale_k, settings


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    algos, seeds, stale_k, settings = _lists(p, args)
    tuned = None if args.untuned else (json.loads(TUNED.read_text()) if TUNED.exists() else {})
    tuned_offline = (
        json.loads(TUNED_OFFLINE.read_text())
        if not args.untuned and TUNED_OFFLINE.exists()
        else None
    )
    path = args.out / "results.jsonl"
    log_path = args.out / "commands.jsonl"
    data = args.out / OFFLINE_DATA
    if not args.report_only and "offline" in settings and not data.exists():
        print(f"offline dataset: {args.offline_rounds} rounds of the base model -> {data}")
        make_offline_dataset(data, args.offline_rounds)
    rows = sum(1 for _ in data.open()) if data.exists() else 0

    def planned(settings: Sequence[str], algos: Sequence[str]) -> list[Job]:
        try:
            return plan(
                seeds,
                settings,
                steps=args.steps,
                eval_every=args.eval_every,
                stale_k=stale_k,
                tuned=tuned,
                algos=algos,
                offline_data=data,
                offline_rows=rows,
                tuned_offline=tuned_offline,
            )
        except KeyError as exc:
            p.error(str(exc.args[0]))

    if args.rerun_changed and not args.report_only:
        for c in retire_changed(planned(settings, algos), path):
            print(f"retired (to rerun at the plan's settings): {c}")
    prefixes = [x for x in args.rerun.split(",") if x]
    if prefixes and not args.report_only:
        keys = {j.key for j in planned(settings, algos) if j.key.startswith(tuple(prefixes))}
        if not keys:
            p.error(f"--rerun {args.rerun!r} names none of the planned runs' keys")
        print(f"retired (to rerun): {retire_keys(path, keys)} records under {', '.join(prefixes)}")
    if not args.report_only:
        cmd = shlex.join([".venv/bin/python", "bench/repro.py", *(argv or sys.argv[1:])])
        run_logged(planned(settings, algos), path, log_path, cmd, processes=args.processes)
    # Records the full study would now run at other settings (tuned.json changed since).
    earlier = changed_records(planned(SETTINGS, ONLINE), path)
    records = read_records(path)
    commands = (
        [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []
    )
    base = next((r for r in records if r.get("setting") == "base"), None)
    if base is None:
        p.error(f"{path} holds no base-model evaluation; run the study first")
    curves = plot(records, float(base["final_accuracy"]), args.out / "curves.png")
    report = build_report(
        records,
        tuned,
        commands,
        sweep_points=sweep_points(),
        earlier=earlier,
        tuned_offline=tuned_offline,
    )
    (args.out / "report.md").write_text(report)
    if args.write_docs:
        img = DOCS_IMG if args.block == "repro" else DOCS_IMG.with_name(f"{args.block}_curves.png")
        write_docs(report, curves, img=img, block=args.block)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
