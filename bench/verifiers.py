"""Verifier throughput, measured side by side in one run.

Prints math checks per second (cheap normal-form path and symbolic path), sandboxed
HumanEval runs per second with 1 and 2 workers, and the sandbox's cost against running
the same program as a bare subprocess, as ratios.

    .venv/bin/python bench/verifiers.py [--problems 48] [--repeats 3] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.verifiers.code import IsolationWarning, find_python, resolve_mode
from actors.verifiers.math import is_equivalent
from actors.verifiers.pool import run_many


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_math(data: Path) -> None:
    with open(data / "gsm8k_test.jsonl") as fh:
        golds = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in fh]
    fast = [(f"{int(g.replace(',', '')):,}.00", g) for g in golds]
    with open(data / "math500_test.jsonl") as fh:
        answers = [json.loads(line)["answer"] for line in fh]
    symbolic = [(f"({a})+0*x", a) for a in answers[:100]]
    is_equivalent("1", "x-x+1")  # start the symbolic worker outside the timing
    for name, pairs in (("normal-form (GSM8K)", fast), ("symbolic (MATH500)", symbolic)):
        t = time.perf_counter()
        hits = sum(is_equivalent(p, g) for p, g in pairs)
        dt = time.perf_counter() - t
        print(
            f"math {name:22s}: {_rate(len(pairs), dt):9.1f} checks/s ({hits}/{len(pairs)} equivalent)"
        )


def _bare(python: str, program: str) -> bool:
    res = subprocess.run(
        [python, "-I", "-S", "-c", program],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    return res.returncode == 0


def bench_code(data: Path, n: int, repeats: int) -> None:
    with gzip.open(data / "HumanEval.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh][:n]
    jobs = [
        (r["prompt"] + r["canonical_solution"], r["test"], r["entry_point"], r["prompt"])
        for r in rows
    ]
    python = find_python() or sys.executable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        mode = resolve_mode("auto")
        run_many(jobs[:2], 1)  # warm caches and the isolation probe

        def bare() -> int:
            return sum(_bare(python, f"{j[0]}\n{j[1]}\ncheck({j[2]})\n") for j in jobs)

        configs = {
            "bare subprocess, 1 worker": bare,
            f"{mode}, 1 worker": lambda: sum(r.passed for r in run_many(jobs, 1)),
            f"{mode}, 2 workers": lambda: sum(r.passed for r in run_many(jobs, 2)),
            "rlimit, 1 worker": lambda: sum(r.passed for r in run_many(jobs, 1, mode="rlimit")),
        }
        times: dict[str, list[float]] = {k: [] for k in configs}
        passed: dict[str, int] = {}
        for _ in range(repeats):  # round-robin, so drift on a shared machine hits all alike
            for name, fn in configs.items():
                t = time.perf_counter()
                passed[name] = fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in configs:
        print(
            f"humaneval {name:26s}: {_rate(len(jobs), med[name]):6.1f} runs/s, "
            f"{1000 * med[name] / len(jobs):6.1f} ms/run ({passed[name]}/{len(jobs)} passed)"
        )
    bare_t, one, two = (
        med["bare subprocess, 1 worker"],
        med[f"{mode}, 1 worker"],
        med[f"{mode}, 2 workers"],
    )
    print(f"ratio {mode} 2 workers / 1 worker throughput: {one / two:.2f}x")
    print(f"ratio {mode} sandbox / bare subprocess time : {one / bare_t:.2f}x")
    print(f"ratio rlimit sandbox / bare subprocess time: {med['rlimit, 1 worker'] / bare_t:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=48, help="HumanEval problems per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin repeats (median)")
    ap.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    args = ap.parse_args()
    bench_math(args.data)
    bench_code(args.data, args.problems, args.repeats)


if __name__ == "__main__":
    main()
