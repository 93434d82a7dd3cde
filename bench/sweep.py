"""Hyper-parameter sweep per online algorithm, scored on the validation split (never on test).

::

    .venv/bin/python bench/sweep.py --out bench/records/sweep [--algos embr_c,d1] [--steps 50] [--stages 1]
    .venv/bin/python bench/sweep.py --out bench/records/sweep --report-only

Every algorithm gets the same budget in stages 1 and 2: ``--steps`` learner steps of 128
rows per point, 5 points (3 with ``--stages 1``), one seed. Stage 1 tries three learning
rates with the algorithm's other settings at their defaults; stage 2, at the stage-1
winner's learning rate, tries two values of the algorithm's own main knob (``STAGE2``). The
point with the highest greedy accuracy on the 500 validation problems
(``task.test_split=validation``) wins. Stage 3 (``--stages 3``), at that winner, changes one
shared setting at a time (``STAGE3_AXES``: warm-up, mask draws, reward normalisation, EUBO
order), each for the algorithms whose loss reads it (``STAGE3``); a stage-3 point replaces
the winner only when it beats it on the same validation problems by an exact sign test at
``ADOPT_P`` (one seed: a smaller gain is within the noise of the evaluation alone). The run writes
``<out>/sweep.jsonl`` (one record per point), ``<out>/sweep.md`` (the tables) and
``bench/tuned.json`` (each algorithm's winning overrides, which bench/repro.py reads);
``--write-docs`` puts the tables into docs/results.md between its ``sweep:begin``/``sweep:end``
markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.localrun import (
    OFFLINE_ROUNDS,
    RECORDS,
    REPO,
    Job,
    make_offline_dataset,
    markers,
    offline_overrides,
    read_records,
    run_many,
    write_block,
)

ALGOS = ("embr_e", "embr_c", "embr_u", "d1", "wd1", "unigrpo", "spg", "bgpo")
STAGE1_LRS = ("1.0e-4", "2.0e-4", "4.0e-4")
# Stage 2: the knob each algorithm is most sensitive to, two values around its default.
STAGE2: dict[str, tuple[tuple[str, ...], ...]] = {
    "embr_e": (("algo.beta=0.02",), ("algo.beta=0.1",)),
    "embr_c": (("algo.beta=0.02",), ("algo.beta=0.1",)),
    "embr_u": (("algo.beta=0.02",), ("algo.beta=0.1",)),
    # With one update per batch d1's ratio is 1 and its clip inactive: the KL weight is its knob.
    "d1": (("algo.kl_coef=0.0",), ("algo.kl_coef=0.2",)),
    # wd1 has no beta: the weight of its reference anchor (ours; 0 is the paper's wd1).
    "wd1": (("algo.kl_coef=0.0",), ("algo.kl_coef=0.2",)),
    # UniGRPO's ratio is 1 on a fresh batch, as d1's: its KL weight.
    "unigrpo": (("algo.kl_coef=0.0",), ("algo.kl_coef=0.2",)),
    # SPG: with one draw per block its blend on negative advantages does not change the
    # gradient (docs/results.md), so its reference anchor off (ours; 0 is the paper's SPG)
    # and two draws per block with the full EUBO (SPG w/ EUBO).
    "spg": (("algo.kl_coef=0.0",), ("algo.num_mc_samples=8", "algo.spg_mix=1.0")),
    # BGPO (our reading): its point is many draws per response; and its anchor off (ours).
    "bgpo": (("algo.kl_coef=0.0",), ("algo.num_mc_samples=8",)),
}
# Stage 3: one shared setting changed at a time from the stage-2 winner. Warm-up: 10% of the
# sweep's 50 steps; draws: half the default (issue 19: the learner's cost is linear in them);
# reward z-scoring per group (centring alone cancels in EMBR-C/U's pair differences); a
# higher EUBO order gamma (1.5 default).
STAGE3_AXES: dict[str, tuple[str, ...]] = {
    "warmup": ("learner.warmup_steps=5",),
    "draws": ("algo.num_mc_samples=2",),
    "reward_norm": ("algo.reward_norm=scale",),
    "eubo_gamma": ("algo.eubo_gamma=3.0",),
}
# The axes each algorithm's loss reads: d1 and wd1 score one step (no draws), only the EMBR
# losses normalise rewards (the policy-gradient ones z-score their advantages already), the
# EUBO is EMBR-U's and SPG's.
STAGE3: dict[str, tuple[str, ...]] = {
    "embr_e": ("warmup", "draws", "reward_norm"),
    "embr_c": ("warmup", "draws", "reward_norm"),
    "embr_u": ("warmup", "draws", "reward_norm", "eubo_gamma"),
    "d1": ("warmup",),
    "wd1": ("warmup",),
    "unigrpo": ("warmup", "draws"),
    "spg": ("warmup", "draws", "eubo_gamma"),
    "bgpo": ("warmup", "draws"),
}
ADOPT_P = 0.05
TUNED = REPO / "bench" / "tuned.json"
# The offline setting (``--setting offline``): the study's offline methods on the study's
# fixed dataset of the base model's samples, the same 3 points each. The KL strength beta is
# the knob there: with no fresh samples it alone bounds how far the dataset pulls the policy
# (the online winners' beta 0.02 lost 9 points offline, docs/results.md).
OFFLINE_ALGOS = ("embr_c", "embr_u", "dpo", "vrpo")
OFFLINE_LR = "1.0e-4"
OFFLINE_BETAS = ("0.05", "0.1", "0.2")
# Relative to the repository root, where the sweep runs (as bench/repro.py names it).
OFFLINE_DATA = Path("bench/records/repro/offline_base.jsonl")
TUNED_OFFLINE = REPO / "bench" / "tuned_offline.json"
DOCS = REPO / "docs" / "results.md"


def _job(algo: str, name: str, overrides: tuple[str, ...], steps: int, stage: int) -> Job:
    return Job(
        key=f"{algo}/{name}",
        overrides=(f"algo.name={algo}", "seed=0", *overrides),
        steps=steps,
        eval_split="validation",
        eval_at=(steps,),
        meta={"algo": algo, "stage": stage, "point": name},
    )


def stage1(algos: list[str], steps: int) -> list[Job]:
    """Three learning rates per algorithm."""
    return [_job(a, f"lr{lr}", (f"learner.lr={lr}",), steps, 1) for a in algos for lr in STAGE1_LRS]


def best(records: list[dict[str, Any]], algo: str, stage: int | None = None) -> dict[str, Any]:
    """``algo``'s winner: of ``stage`` when given, else over all stages.

    Stages 1 and 2 pick the highest validation accuracy; a stage-3 point replaces that winner
    only when :func:`versus` gives it a higher accuracy at sign-test p < ``ADOPT_P``.
    """
    rows = [r for r in records if r["algo"] == algo and (stage is None or r["stage"] == stage)]
    early = [r for r in rows if r["stage"] < 3]
    if not rows or (stage is None and not early):
        raise ValueError(
            f"no finished sweep point for {algo!r}" + (f" in stage {stage}" if stage else "")
        )
    if stage is not None:
        return max(rows, key=lambda r: r["final_accuracy"])
    incumbent = max(early, key=lambda r: (r["final_accuracy"], -r["stage"]))
    adopted = [r for r in rows if r["stage"] == 3 and versus(r, incumbent)[2] < ADOPT_P
               and r["final_accuracy"] > incumbent["final_accuracy"]]  # fmt: skip
    return max(adopted, key=lambda r: r["final_accuracy"]) if adopted else incumbent


def versus(rec: dict[str, Any], other: dict[str, Any]) -> tuple[int, int, float]:
    """Validation problems ``rec`` solves and ``other`` does not, the reverse, exact sign-test p."""
    from embr_rl.report import paired_flips, sign_test_p

    fixed, broken = paired_flips(other.get("final_rewards", {}), rec.get("final_rewards", {}))
    return fixed, broken, sign_test_p(fixed, broken)


def _lr_of(rec: dict[str, Any]) -> str:
    return next(o for o in rec["overrides"] if o.startswith("learner.lr=")).split("=", 1)[1]


def stage2(algos: list[str], steps: int, records: list[dict[str, Any]]) -> list[Job]:
    """Each algorithm's own knob at its stage-1 learning rate."""
    jobs = []
    for a in algos:
        lr = _lr_of(best(records, a, stage=1))
        for knob in STAGE2[a]:
            extra = (
                knob
                if any(k.startswith("learner.lr=") for k in knob)
                else (
                    f"learner.lr={lr}",
                    *knob,
                )
            )
            name = "+".join(k.replace("algo.", "").replace("learner.", "") for k in extra)
            jobs.append(_job(a, name, tuple(extra), steps, 2))
    return jobs


def stage3(algos: list[str], steps: int, records: list[dict[str, Any]]) -> list[Job]:
    """One ``STAGE3_AXES`` setting at a time on each algorithm's stage-1/2 winner."""
    jobs = []
    for a in algos:
        base = tuned_overrides(best([r for r in records if r["stage"] < 3], a))
        for axis in STAGE3[a]:
            change = STAGE3_AXES[axis]
            keys = {c.split("=", 1)[0] for c in change}
            kept = [o for o in base if o.split("=", 1)[0] not in keys]
            jobs.append(_job(a, axis, (*kept, *change), steps, 3))
    return jobs


def offline_points(algos: list[str], steps: int, data: Path, rows: int) -> list[Job]:
    """``OFFLINE_BETAS`` at ``OFFLINE_LR`` for each offline method, on the dataset ``data``."""
    jobs = []
    for a in algos:
        for beta in OFFLINE_BETAS:
            job = _job(
                a, f"beta{beta}", (f"learner.lr={OFFLINE_LR}", f"algo.beta={beta}"), steps, 1
            )
            jobs.append(
                dataclasses.replace(
                    job,
                    key=f"offline/{job.key}",
                    overrides=(*job.overrides, *offline_overrides(data, rows)),
                )
            )
    return jobs


def tuned_overrides(rec: dict[str, Any]) -> list[str]:
    """The winning point's overrides, less the algorithm name and seed."""
    skip = ("algo.name=", "seed=", "algo.mode=", "buffer.offline_", "buffer.capacity=")
    return [o for o in rec["overrides"] if not o.startswith(skip)]


def report(
    records: list[dict[str, Any]],
    algos: list[str],
    steps: int,
    source: str = "from the shipped base model",
) -> str:
    """Markdown tables of every point and each algorithm's winner."""
    lines = [
        f"Validation accuracy (500 validation problems, greedy) after {steps} learner steps of "
        f"128 rows, seed 0, {source}.",
        "",
        "| algorithm | stage | point | validation accuracy | final training reward | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for a in algos:
        for r in sorted((r for r in records if r["algo"] == a), key=lambda r: r["key"]):
            tail = r["reward_curve"][-10:]
            lines.append(
                f"| {a} | {r['stage']} | {r['point']} | {r['final_accuracy']:.3f} | "
                f"{sum(tail) / max(len(tail), 1):.3f} | {r['seconds']:.0f} |"
            )
    third = [r for r in records if r["algo"] in algos and r["stage"] == 3]
    if third:
        lines += [
            "",
            f"Stage 3, one shared setting changed from the stage-1/2 winner, paired on the same "
            f"validation problems (adopted at exact sign-test p < {ADOPT_P}):",
            "",
            "| algorithm | setting | validation accuracy | vs winner | solved only here / only there | p | adopted |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in algos:
            early = [r for r in records if r["algo"] == a and r["stage"] < 3]
            if not early:
                continue
            inc, chosen = best(early, a), best(records, a)
            for r in sorted((r for r in third if r["algo"] == a), key=lambda r: r["key"]):
                fixed, broken, pv = versus(r, inc)
                lines.append(
                    f"| {a} | `{' '.join(STAGE3_AXES.get(r['point'], (r['point'],)))}` | "
                    f"{r['final_accuracy']:.3f} | {100 * (r['final_accuracy'] - inc['final_accuracy']):+.1f} | "
                    f"{fixed} / {broken} | {pv:.2g} | {'yes' if r is chosen else 'no'} |"
                )
    lines += ["", "| algorithm | chosen settings | validation accuracy |", "|---|---|---|"]
    for a in algos:
        if any(r["algo"] == a for r in records):
            b = best(records, a)
            lines.append(f"| {a} | `{' '.join(tuned_overrides(b))}` | {b['final_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=RECORDS / "sweep")
    p.add_argument(
        "--setting",
        choices=("online", "offline"),
        default="online",
        help="offline: OFFLINE_ALGOS on the study's fixed dataset -> bench/tuned_offline.json",
    )
    p.add_argument("--algos", default=None, help="default: every method of the setting")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument(
        "--stages",
        type=int,
        choices=(1, 2, 3),
        default=2,
        help="1: learning rates only; 3: also the shared settings (STAGE3_AXES)",
    )
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--write-docs", action="store_true", help="the tables into docs/results.md")
    p.add_argument(
        "--block",
        default="sweep",
        help="docs/results.md's markers for --write-docs: <!-- BLOCK:begin --> ... :end -->",
    )
    args = p.parse_args(argv)
    allowed = OFFLINE_ALGOS if args.setting == "offline" else ALGOS
    algos = [a.strip() for a in (args.algos or ",".join(allowed)).split(",") if a.strip()]
    bad = [a for a in algos if a not in allowed]
    if bad:
        p.error(f"unknown {args.setting} algorithm {bad[0]!r}; allowed: {', '.join(allowed)}")
    if args.setting == "offline":
        return _offline_main(args, algos)
    path = args.out / "sweep.jsonl"
    if not args.report_only:
        run_many(stage1(algos, args.steps), path, processes=args.processes)
        if args.stages >= 2:
            run_many(stage2(algos, args.steps, read_records(path)), path, processes=args.processes)
        if args.stages == 3:
            run_many(stage3(algos, args.steps, read_records(path)), path, processes=args.processes)
    records = read_records(path)
    return _publish(records, algos, args, report(records, algos, args.steps), "sweep.md", TUNED)


def _publish(
    records: list[dict[str, Any]],
    algos: list[str],
    args: argparse.Namespace,
    text: str,
    name: str,
    tuned_path: Path,
) -> int:
    """Write the tables to ``<out>/name`` (and docs with ``--write-docs``) and each swept
    algorithm's winner into ``tuned_path``, keeping the other algorithms' entries."""
    (args.out / name).write_text(text)
    tuned = json.loads(tuned_path.read_text()) if tuned_path.exists() else {}
    for a in algos:
        if any(r["algo"] == a for r in records):
            b = best(records, a)
            tuned[a] = {
                "overrides": tuned_overrides(b),
                "validation_accuracy": b["final_accuracy"],
                "steps": args.steps,
            }
    tuned_path.write_text(json.dumps(tuned, indent=2, sort_keys=True) + "\n")
    if args.write_docs:
        write_block(DOCS, *markers(args.block), text)
    print(text)
    return 0


def _offline_main(args: argparse.Namespace, algos: list[str]) -> int:
    path = args.out / "offline.jsonl"
    if not args.report_only:
        if not OFFLINE_DATA.exists():
            # The study's dataset (bench/repro.py makes the same one with its defaults).
            make_offline_dataset(OFFLINE_DATA, OFFLINE_ROUNDS)
        rows = sum(1 for _ in OFFLINE_DATA.open())
        run_many(
            offline_points(algos, args.steps, OFFLINE_DATA, rows), path, processes=args.processes
        )
    records = read_records(path)
    source = (
        f"offline on the study's fixed dataset of the base model's samples ({OFFLINE_DATA}), "
        f"learning rate {OFFLINE_LR}"
    )
    text = report(records, algos, args.steps, source)
    return _publish(records, algos, args, text, "offline.md", TUNED_OFFLINE)


if __name__ == "__main__":
    raise SystemExit(main())
