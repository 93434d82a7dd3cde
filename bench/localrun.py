"""One training run of Algorithm 1 in one process (embr_rl.local_loop), for the sweep and the study.

``run_one(job)`` trains ``configs/demo.yaml`` with the job's ``key=value`` overrides in sync
mode (no Ray: a seeded run is bit-reproducible), evaluates the policy greedily on the job's
split at the listed learner steps, and returns a JSON-ready record: the training-reward
curve, accuracy against step and samples, and every evaluated problem's reward at the last
evaluation (for paired sign tests). ``run_many`` runs jobs in ``jobs`` spawned processes of
one torch thread each (2 threads under contention are ~5x slower than 1 on this machine)
and appends each record to a JSONL file as it finishes, skipping keys already there, so an
interrupted sweep or study resumes.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "demo.yaml"
# The sweep's and the study's records (JSONL, a few MB) are committed: the docs' tables are
# generated from them alone, and a study extended on another machine resumes from them.
RECORDS = REPO / "bench" / "records"

# The sweep's starting point: the algorithm settings configs/demo.yaml held when the sweep
# ran (lr 2e-4 with linear decay, beta 0.05, no warm-up). Pinned so that the records of the
# sweep and the study mean the same runs whatever the demo sets now (it took the sweep's
# EMBR-E winner); every job's own overrides come after these and win.
SWEEP_START: tuple[str, ...] = ("learner.lr=2.0e-4", "algo.beta=0.05", "learner.warmup_steps=0")
# Every sweep and study run: Algorithm 1 in sync mode in one process, 16 prompts x 8
# completions = one 128-row learner batch per step (the demo's batch), one verifier process.
LOCAL_OVERRIDES: tuple[str, ...] = (
    "algo.mode=sync",
    "rollout.num_workers=1",
    "rollout.prompts_per_batch=16",
    "verifier.num_processes=1",
    "logging.progress=never",
    *SWEEP_START,
)


@dataclass(frozen=True)
class Job:
    """One run: its id, overrides of configs/demo.yaml, learner steps, evaluation split and steps."""

    key: str
    overrides: tuple[str, ...]
    steps: int
    eval_split: str
    eval_at: tuple[int, ...]
    eval_limit: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def run_one(job: Job) -> dict[str, Any]:
    """Train and evaluate ``job`` in this process; returns its record (``status`` ``done``/``failed``)."""
    import torch

    torch.set_num_threads(1)
    from embr_rl.core.config import load_config
    from embr_rl.core.tasks import load_task
    from embr_rl.local_loop import LocalLoop
    from learner.learner import shutdown_distributed

    t0 = time.time()
    record: dict[str, Any] = {"key": job.key, **job.meta, "overrides": list(job.overrides)}
    try:
        cfg = load_config(
            str(BASE_CONFIG),
            [*LOCAL_OVERRIDES, f"learner.total_steps={max(job.steps, 1)}", *job.overrides],
        )
        if job.eval_limit is not None:
            cfg.eval.limit = job.eval_limit
        problems = load_task(cfg.task, job.eval_split)
        if cfg.eval.limit is not None:
            problems = problems[: cfg.eval.limit]
        loop = LocalLoop(cfg)
        rows_per_round = cfg.rollout.prompts_per_batch * cfg.rollout.group_size
        evals: list[dict[str, Any]] = []
        rewards: list[float] = []
        last: dict[str, float] = {}

        def evaluate() -> None:
            nonlocal last
            res = loop.evaluate(problems)
            last = {s["id"]: float(s["reward"]) for s in res.samples}
            evals.append({"step": loop.step, "samples": loop.samples, "accuracy": res.accuracy})

        if 0 in job.eval_at:
            evaluate()
        for target in sorted(s for s in job.eval_at if s > 0):
            loop.run(min(target, job.steps), log=lambda r: rewards.append(round(r.reward, 4)))
            evaluate()
        if loop.step < job.steps:
            loop.run(job.steps, log=lambda r: rewards.append(round(r.reward, 4)))
        metrics_tail = loop.history[-1].metrics if loop.history else {}
        loop.close()
        shutdown_distributed()
        record |= {
            "status": "done",
            "steps": loop.step,
            "rows_per_round": rows_per_round,
            "samples": loop.samples,
            "reward_curve": rewards,
            "evals": evals,
            "final_accuracy": evals[-1]["accuracy"] if evals else None,
            "final_rewards": last,
            "last_metrics": {k: round(float(v), 4) for k, v in metrics_tail.items()},
        }
    except Exception:
        record |= {"status": "failed", "error": traceback.format_exc()[-2000:]}
    record["seconds"] = round(time.time() - t0, 1)
    return record


# Rounds of the base model's rollouts in the study's offline dataset (bench/repro.py's
# --offline-rounds default; bench/sweep.py --setting offline makes the same one).
OFFLINE_ROUNDS = 32


def offline_overrides(data: Path, rows: int) -> tuple[str, ...]:
    """The overrides that train a job offline on the scored dataset ``data`` of ``rows`` rows."""
    return (
        "algo.mode=offline",
        f"buffer.offline_path={data}",
        f"buffer.offline_cache_dir={data.parent / 'cache'}",
        f"buffer.capacity={max(rows, 1)}",
    )


def make_offline_dataset(path: Path, rounds: int, *, seed: int = 0) -> int:
    """Write ``rounds`` rollout batches of the base model (16 prompts x 8 completions each, the
    study's rounds, verifier-scored) to ``path`` as a scored offline dataset (docs/buffer.md:
    JSON lines of ``prompt``, ``completion``, ``reward``, ``prompt_id``, ``sample_id``);
    returns the number of rows. The texts are the token ids decoded with special tokens kept,
    which the offline loader encodes back to the same ids (the EOS fill of the window too)."""
    import torch

    torch.set_num_threads(1)
    from embr_rl.core.config import load_config
    from embr_rl.local_loop import LocalLoop
    from learner.learner import shutdown_distributed

    # EMBR-C, as when the committed dataset was drawn (the algorithm's traits set the rows'
    # mask seeds, drawn from the same generator as the samples).
    cfg = load_config(str(BASE_CONFIG), [*LOCAL_OVERRIDES, "algo.name=embr_c", f"seed={seed}"])
    loop = LocalLoop(cfg)
    tok = loop.loaded.tokenizer
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tmp.open("w") as f:
            for _ in range(rounds):
                rows = loop.worker.generate(loop.stream.take(cfg.rollout.prompts_per_batch))
                for r in rows.to_pylist():
                    rec = {
                        "prompt": tok.decode(r["prompt_ids"], skip_special_tokens=False),
                        "completion": tok.decode(r["completion_ids"], skip_special_tokens=False),
                        "reward": r["reward"],
                        "prompt_id": r["prompt_id"],
                        "sample_id": r["sample_id"],
                    }
                    f.write(json.dumps(rec) + "\n")
                    n += 1
    finally:
        loop.close()
        shutdown_distributed()
    tmp.replace(path)
    return n


def done_keys(path: Path) -> set[str]:
    """Keys of finished runs already in the JSONL file ``path``."""
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("status") == "done":
                keys.add(r["key"])
    return keys


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every finished record of ``path`` (the last one wins for a key run twice)."""
    if not path.exists():
        return []
    by_key: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("status") == "done":
                by_key[r["key"]] = r
    return list(by_key.values())


def _normalised(overrides: Sequence[str]) -> list[str]:
    """``key=value`` overrides with path values (``*_path``, ``*_dir``) made absolute."""
    out = []
    for o in overrides:
        k, _, v = o.partition("=")
        out.append(f"{k}={Path(v).resolve()}" if k.endswith(("_path", "_dir")) else o)
    return out


@dataclass(frozen=True)
class Changed:
    """A finished run whose recorded overrides differ from its job's now: the overrides only
    the record has (``was``) and those only the plan has (``now``)."""

    key: str
    was: tuple[str, ...]
    now: tuple[str, ...]

    def change(self) -> str:
        """``was -> now``; an empty side was the schema default."""
        return f"{' '.join(self.was) or '(default)'} -> {' '.join(self.now) or '(default)'}"

    def __str__(self) -> str:
        return f"{self.key}: {self.change()}"


def changed_records(jobs: Sequence[Job], out: Path) -> list[Changed]:
    """The finished runs in ``out`` whose recorded overrides differ from their job's (a tuned
    setting changed since they ran)."""
    planned = {j.key: _normalised(j.overrides) for j in jobs}
    changed = []
    for r in read_records(out):
        now = planned.get(r["key"])
        if now is None:
            continue
        was = _normalised(r.get("overrides", []))
        if was != now:
            gone = tuple(o for o in was if o not in now)
            changed.append(Changed(r["key"], gone, tuple(o for o in now if o not in was)))
    return changed


def retire_changed(jobs: Sequence[Job], out: Path) -> list[Changed]:
    """Move the records of ``out`` that :func:`changed_records` lists (every line of their keys)
    to ``<out stem>.retired.jsonl`` beside it, so that :func:`run_many` runs those jobs again
    at the plan's settings; nothing is deleted. Returns what was retired."""
    changed = changed_records(jobs, out)
    if changed:
        retire_keys(out, {c.key for c in changed})
    return changed


def retire_keys(out: Path, keys: set[str]) -> int:
    """Move every line of ``out`` whose key is in ``keys`` to ``<out stem>.retired.jsonl``
    beside it (appended; nothing is deleted); returns how many lines moved."""
    if not keys or not out.exists():
        return 0
    keep, gone = [], []
    for line in out.read_text().splitlines():
        if line.strip():
            (gone if json.loads(line)["key"] in keys else keep).append(line + "\n")
    if gone:
        with out.with_name(out.stem + ".retired.jsonl").open("a") as f:
            f.writelines(gone)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(out)
    return len(gone)


def run_many(
    jobs: Sequence[Job],
    out: Path,
    *,
    processes: int,
    log: Callable[[str], None] = print,
) -> int:
    """Run the jobs whose keys ``out`` does not yet hold, ``processes`` at a time, appending
    records; returns how many ran."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = changed_records(jobs, out)
    if stale:
        shown = "; ".join(map(str, stale[:3])) + (
            f"; and {len(stale) - 3} more" if len(stale) > 3 else ""
        )
        raise ValueError(
            f"{out} holds finished runs whose settings differ from the plan now ({shown}); "
            "retire those records (bench/repro.py --rerun-changed moves them to "
            "<name>.retired.jsonl) or pass another --out to run them again"
        )
    finished = done_keys(out)
    todo = [j for j in jobs if j.key not in finished]
    log(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {out}; {len(todo)} to run")
    if not todo:
        return 0
    env_threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.environ.update(env_threads)
    with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, j): j for j in todo}
        for n, fut in enumerate(as_completed(futures), 1):
            rec = fut.result()
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            acc = rec.get("final_accuracy")
            shown = "failed" if rec["status"] != "done" else f"accuracy {acc:.3f}"
            log(f"[{n}/{len(todo)}] {rec['key']}: {shown} ({rec['seconds']:.0f} s)")
    return len(todo)


def markers(block: str) -> tuple[str, str]:
    """The marker lines of the docs block ``block``: ``<!-- block:begin -->``, ``:end -->``."""
    return f"<!-- {block}:begin -->", f"<!-- {block}:end -->"


def write_block(path: Path, begin: str, end: str, body: str) -> None:
    """Replace the text between the marker lines ``begin`` and ``end`` of ``path`` with ``body``."""
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{path} must hold the markers {begin} ... {end} once each")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}{end}{tail}")
