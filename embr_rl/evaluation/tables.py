"""Accuracy tables by task and generation length (pure functions, no model, no I/O).

:func:`aggregate` turns per-sample records (``task``, ``length``, ``correct``) into one
:class:`Cell` per task and length; :func:`render_markdown` lays the cells out with one row
per task and one column per length (plus their mean), :func:`render_csv` writes them in
long form (one line per task and length).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CSV_COLUMNS = ("task", "length", "num", "correct", "accuracy")


@dataclass(frozen=True)
class Cell:
    """How many of ``num`` samples of ``task`` decoded at ``length`` tokens were correct."""

    task: str
    length: int
    num: int
    correct: int

    @property
    def accuracy(self) -> float:
        """Fraction correct (0.0 for an empty cell)."""
        return self.correct / self.num if self.num else 0.0


def aggregate(records: Iterable[Mapping[str, Any]]) -> list[Cell]:
    """One cell per (task, length): tasks in order of first appearance, lengths ascending."""
    counts: dict[tuple[str, int], list[int]] = {}
    task_order: dict[str, int] = {}
    for r in records:
        task, length = str(r["task"]), int(r["length"])
        task_order.setdefault(task, len(task_order))
        num_correct = counts.setdefault((task, length), [0, 0])
        num_correct[0] += 1
        num_correct[1] += int(bool(r["correct"]))
    keys = sorted(counts, key=lambda k: (task_order[k[0]], k[1]))
    return [Cell(t, n, counts[(t, n)][0], counts[(t, n)][1]) for t, n in keys]


def _percent(value: float, decimals: int) -> str:
    return f"{100 * value:.{decimals}f}"


def render_markdown(cells: Sequence[Cell], decimals: int = 1) -> str:
    """A Markdown table of accuracy in percent: a row per task, a column per length, and a
    ``mean`` column (the unweighted mean over lengths) when there is more than one length.
    ``n`` is the number of problems per length (a range when lengths differ); a missing
    task/length pair shows ``-``."""
    tasks = list(dict.fromkeys(c.task for c in cells))
    lengths = sorted({c.length for c in cells})
    by_key = {(c.task, c.length): c for c in cells}
    with_mean = len(lengths) > 1
    header = ["task", "n", *(str(n) for n in lengths), *(["mean"] if with_mean else [])]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---:", *(["---:"] * (len(header) - 2))]) + "|",
    ]
    for task in tasks:
        row = [by_key.get((task, n)) for n in lengths]
        present = [c for c in row if c is not None]
        sizes = sorted({c.num for c in present})
        size = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        values = ["-" if c is None else _percent(c.accuracy, decimals) for c in row]
        if with_mean:
            accs = [c.accuracy for c in present]
            values.append(_percent(sum(accs) / len(accs), decimals) if accs else "-")
        lines.append("| " + " | ".join([task, size, *values]) + " |")
    return "\n".join(lines) + "\n"


def render_csv(cells: Sequence[Cell]) -> str:
    """CSV in long form: ``task,length,num,correct,accuracy`` (accuracy a fraction, 4 decimals)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in cells:
        writer.writerow([c.task, c.length, c.num, c.correct, f"{c.accuracy:.4f}"])
    return buf.getvalue()
