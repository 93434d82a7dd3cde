"""How many learner steps the study needs: validation accuracy against steps, to its plateau.

::

    .venv/bin/python bench/plateau.py --out bench/records/plateau [--algos embr_c,d1] \\
        [--seeds 0] [--steps 160] [--eval-every 20] [--tol 1.0] [--write-docs]
    .venv/bin/python bench/plateau.py --out bench/records/plateau --report-only [--write-docs]

Each method runs at its tuned settings (``bench/tuned.json``, as in the study) for
``--steps`` learner steps of 128 rows, evaluated greedily on the 500 validation problems
(never the test split) every ``--eval-every`` steps. A method's plateau is the first
evaluation step ``s`` after which its mean accuracy over seeds never rises more than
``--tol`` points above its accuracy at ``s``; the study's length (``bench/repro.py
--steps``) is the largest plateau over the methods. Records go to ``<out>/results.jsonl``
(resumable, like the study's); the table to ``<out>/report.md`` and, with ``--write-docs``,
into docs/results.md between its ``plateau:begin``/``plateau:end`` markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.localrun import RECORDS, Job, markers, read_records, run_many, write_block
from bench.repro import DOCS, LABELS, TUNED, eval_points, tuned_overrides


def plan(
    algos: Sequence[str], seeds: Sequence[int], steps: int, every: int, tuned: Mapping[str, Any]
) -> list[Job]:
    """One validation-evaluated run per method and seed."""
    return [
        Job(
            f"plateau/{a}/seed{s}",
            (f"algo.name={a}", *tuned_overrides(a, tuned), f"seed={s}"),
            steps,
            "validation",
            eval_points(steps, every, 1),
            meta={"algo": a, "seed": s},
        )
        for s in seeds
        for a in algos
    ]


def mean_curve(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """Mean accuracy (points) over the records at every step they all evaluated."""
    steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in records)))
    by_step = [{e["step"]: e["accuracy"] for e in r["evals"]} for r in records]
    return [(s, 100 * statistics.fmean(b[s] for b in by_step)) for s in steps]


def plateau_step(curve: Sequence[tuple[int, float]], tol: float) -> int | None:
    """The first step after which accuracy never exceeds its value there by more than ``tol``;
    None when only the last point qualifies (still rising at the end: no plateau in range)."""
    for i, (step, acc) in enumerate(curve[:-1]):
        if all(later <= acc + tol for _, later in curve[i + 1 :]):
            return step
    return None


def report(records: Sequence[Mapping[str, Any]], tol: float) -> str:
    """The validation-accuracy table and each method's plateau step."""
    by_algo: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_algo.setdefault(r["algo"], []).append(r)
    if not by_algo:
        return "No finished runs.\n"
    lines = [
        "Validation accuracy (%, greedy, 500 validation problems; mean over seeds) against "
        f"learner steps of 128 rows; plateau: the first step after which accuracy never rises "
        f"more than {tol:g} points above its value there.",
        "",
    ]
    curves = {a: mean_curve(rs) for a, rs in sorted(by_algo.items())}
    steps = sorted({s for c in curves.values() for s, _ in c})
    lines += [
        "| method | seeds | " + " | ".join(str(s) for s in steps) + " | plateau |",
        "|---|---|" + "---:|" * len(steps) + "---|",
    ]
    plateaus: dict[str, int | None] = {}
    for a, c in curves.items():
        at = dict(c)
        plateaus[a] = plateau_step(c, tol)
        cells = " | ".join(f"{at[s]:.1f}" if s in at else "-" for s in steps)
        shown = "not reached" if plateaus[a] is None else str(plateaus[a])
        lines.append(f"| {LABELS.get(a, a)} | {len(by_algo[a])} | {cells} | {shown} |")
    reached = [p for p in plateaus.values() if p is not None]
    lines.append("")
    if len(reached) == len(plateaus):
        lines.append(f"Study length (largest plateau): {max(reached)} steps.")
    else:
        lines.append("Study length: not determined (a method had not plateaued by its last step).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RECORDS / "plateau")
    p.add_argument("--algos", default="embr_c,d1")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--tol", type=float, default=1.0, help="points")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--write-docs", action="store_true", help="the table into docs/results.md")
    args = p.parse_args()
    results = args.out / "results.jsonl"
    if not args.report_only:
        tuned = json.loads(TUNED.read_text())
        seeds = [int(s) for s in args.seeds.split(",")]
        jobs = plan(args.algos.split(","), seeds, args.steps, args.eval_every, tuned)
        run_many(jobs, results, processes=args.processes)
    text = report(read_records(results), args.tol)
    (args.out / "report.md").parent.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text)
    if args.write_docs:
        write_block(DOCS, *markers("plateau"), text)
    print(text)


if __name__ == "__main__":
    main()
