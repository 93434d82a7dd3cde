"""``python -m embr_rl.eval``: benchmark accuracy by task and generation length.

The d1 protocol: greedy decoding (temperature 0), blocks of ``--block-length`` (32) tokens,
``steps = length / 2``, low-confidence remasking, the d1 prompt (reasoning then answer tags)
inside the chat template for the benchmarks. Every task is decoded at every length; the
samples go to ``generations.jsonl`` and the accuracies to ``accuracy.md`` / ``accuracy.csv``
in the output folder. With ``--ray`` (or when ``RAY_ADDRESS`` is set) the problems are
split over ``--workers`` Ray actors that each load the model once; the merged result is the
same as a local run's. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.verifiers import Score
from actors.verifiers.pool import ProblemScorer
from embr_rl.core.config import (
    Config,
    ConfigError,
    EvalConfig,
    ModelConfig,
    VerifierConfig,
    load_config,
    save_config,
)
from embr_rl.core.tasks import Problem, load_task, task_names
from embr_rl.evaluation.progress import Progress
from embr_rl.evaluation.tables import aggregate, render_csv, render_markdown

REPO = Path(__file__).resolve().parents[2]
# The benchmark files next to the repository (what the tests and CI read).
SHARED_DATA = REPO.parent / "shared" / "data"
BENCHMARKS = ("gsm8k", "math500", "humaneval")
DEFAULT_LENGTHS = "128,256,512"
DEFAULT_BLOCK_LENGTH = 32
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class UsageError(ValueError):
    """A bad option or argument; the message names it and what is allowed."""


# --------------------------------------------------------------------------- options


@dataclass
class EvalOptions:
    """Everything one evaluation needs, resolved from the command line and the config."""

    model: str
    tasks: list[str]
    lengths: list[int]
    block_length: int
    limit: int | None
    data_dir: str | None
    out: Path
    prompt_format: str | None  # None: d1 for the benchmarks, plain for arith
    chat_template: bool | None  # None: on for the benchmarks, off for arith
    use_ray: bool
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float | None  # None: 1 when the cluster has GPUs, else 0
    progress: bool
    cfg: Config

    def prompt_settings(self, task: str) -> tuple[str, bool]:
        """(prompt format, chat template) for ``task``: the flags, else d1's defaults."""
        bench = task in BENCHMARKS
        fmt = self.prompt_format or ("d1" if bench else "plain")
        chat = self.chat_template if self.chat_template is not None else bench
        return fmt, chat

    def eval_config(self, length: int) -> EvalConfig:
        """Decoding settings at ``length``: d1's ``steps = length / 2`` in blocks of
        ``block_length``, the rest (batch size, temperature, fast modes) from ``cfg.eval``."""
        return dataclasses.replace(
            self.cfg.eval, gen_length=length, block_length=self.block_length, steps=length // 2
        )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises :class:`UsageError` instead of exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command's options (see docs/evaluation.md)."""
    p = _Parser(
        prog="python -m embr_rl.eval",
        description="Accuracy of a masked-diffusion LM on benchmarks, by generation length "
        "(d1 protocol: temperature 0, blocks of 32, steps = length/2).",
    )
    p.add_argument(
        "args",
        nargs="*",
        metavar="MODEL [key=value ...]",
        help="a model folder (save_pretrained + tokenizer) or a Hugging Face hub id, then "
        "config overrides such as verifier.code.timeout_s=20",
    )
    p.add_argument(
        "--task",
        help=f"comma-separated tasks from {', '.join(task_names())} "
        "(default: gsm8k, or task.name of --config)",
    )
    p.add_argument(
        "--lengths",
        default=DEFAULT_LENGTHS,
        help=f"comma-separated generation lengths, multiples of --block-length (default {DEFAULT_LENGTHS})",
    )
    p.add_argument(
        "--block-length",
        type=_positive_int,
        default=DEFAULT_BLOCK_LENGTH,
        help=f"semi-autoregressive block length, even (default {DEFAULT_BLOCK_LENGTH})",
    )
    p.add_argument("--limit", type=_positive_int, help="evaluate the first N problems of each task")
    p.add_argument(
        "--data-dir",
        help="folder with the benchmark files (default: task.data_dir of --config, else "
        f"{SHARED_DATA} when it exists, else the Hugging Face Hub)",
    )
    p.add_argument("--out", help="output folder (default runs/eval/<model name>)")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        help="prompts per forward batch (default eval.batch_size: 64)",
    )
    p.add_argument(
        "--threshold",
        type=_unit_interval,
        help="fast mode: commit every position at least this confident (default off)",
    )
    p.add_argument(
        "--cache",
        choices=["prefix", "dual"],
        help="fast mode: Fast-dLLM key/value cache (default off)",
    )
    p.add_argument(
        "--prompt-format",
        choices=["d1", "plain"],
        help="prompt layout (default: d1 for the benchmarks, plain for arith)",
    )
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the tokenizer's chat template, LLaDA's when it has none "
        "(default: on for the benchmarks, off for arith)",
    )
    p.add_argument("--config", help="YAML config for model, task, verifier and eval settings")
    p.add_argument("--seed", type=int, help="decoding seed (default: seed of the config, 0)")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default auto)"
    )
    p.add_argument(
        "--ray",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="split the problems over Ray workers (default: on when RAY_ADDRESS is set)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        help="Ray workers, each loads the model once (default 2)",
    )
    p.add_argument(
        "--cpus-per-worker", type=_non_negative, default=1.0, help="Ray CPUs per worker (default 1)"
    )
    p.add_argument(
        "--gpus-per-worker",
        type=_non_negative,
        help="Ray GPUs per worker (default: 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show the progress display on stderr"
    )
    return p


def _split_list(flag: str, text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise UsageError(f"bad value for {flag}: {text!r}; allowed: a comma-separated list")
    return list(dict.fromkeys(items))


def parse_tasks(text: str) -> list[str]:
    """``gsm8k,math500`` -> the task names, each checked against the registered tasks."""
    allowed = task_names()
    tasks = _split_list("--task", text)
    for t in tasks:
        if t not in allowed:
            raise UsageError(f"bad value for --task: {t!r}; allowed: {', '.join(allowed)}")
    return tasks


def parse_lengths(text: str, block_length: int) -> list[int]:
    """``128,256`` -> lengths, each a positive multiple of ``block_length`` (which must be
    even, so that ``steps = length / 2`` splits evenly over the blocks)."""
    if block_length % 2:
        raise UsageError(
            f"bad value for --block-length: {block_length}; allowed: an even number (steps = "
            "length/2 must split evenly over the length/block_length blocks)"
        )
    lengths: list[int] = []
    for item in _split_list("--lengths", text):
        try:
            n = int(item)
        except ValueError:
            n = 0
        if n < 1 or n % block_length:
            raise UsageError(
                f"bad value for --lengths: {item!r}; allowed: positive multiples of "
                f"--block-length ({block_length}), e.g. {block_length},{4 * block_length}"
            )
        lengths.append(n)
    return lengths


def check_model_arg(model: str) -> None:
    """A local folder must exist and hold a model; anything else must look like a hub id."""
    if model == "builtin":
        raise UsageError(
            "bad MODEL: 'builtin' is an untrained architecture; pass a saved model folder "
            "(e.g. runs/demo/base_model after `make demo`) or a hub id"
        )
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(
                f"bad MODEL: {model} is not a model folder (expected config.json, weights and "
                "tokenizer files as written by save_pretrained)"
            )
        return
    looks_local = model.startswith(("/", ".", "~")) or model.endswith("/")
    if looks_local or not _HUB_ID.match(model):
        raise UsageError(
            f"bad MODEL: model folder {model} not found (and it is not a hub id such as "
            "GSAI-ML/LLaDA-8B-Instruct)"
        )


def default_out(model: str) -> Path:
    """``runs/eval/<last part of the model path or hub id>``."""
    name = Path(model.rstrip("/")).name or "model"
    return Path("runs") / "eval" / name


def parse_args(argv: Sequence[str]) -> EvalOptions:
    """Parse and check the command line (and the config it names); raise UsageError/ConfigError."""
    ns = build_parser().parse_intermixed_args(list(argv))
    positional = list(ns.args)
    overrides = [a for a in positional if "=" in a and not Path(a).exists()]
    models = [a for a in positional if a not in overrides]
    if len(models) > 1:
        raise UsageError(
            f"bad arguments: {' '.join(models)}; allowed: one MODEL, then key=value overrides"
        )
    cfg = load_config(ns.config, overrides)
    if ns.device is not None:
        cfg.model.device = ns.device
    if ns.seed is not None:
        cfg.seed = ns.seed
    model = models[0] if models else (cfg.model.path if ns.config else None)
    if not model:
        raise UsageError("missing MODEL: a model folder or hub id (or --config with model.path)")
    check_model_arg(model)
    tasks = parse_tasks(ns.task or (cfg.task.name if ns.config else "gsm8k"))
    lengths = parse_lengths(ns.lengths, ns.block_length)
    updates: dict[str, Any] = {}
    if ns.batch_size is not None:
        updates["batch_size"] = ns.batch_size
    if ns.threshold is not None:
        updates["threshold"] = ns.threshold
    if ns.cache is not None:
        updates["cache"] = ns.cache
    cfg.eval = dataclasses.replace(cfg.eval, **updates)
    data_dir = ns.data_dir
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"bad value for --data-dir: {data_dir} is not a folder")
    if data_dir is None:
        data_dir = cfg.task.data_dir or (str(SHARED_DATA) if SHARED_DATA.is_dir() else None)
    use_ray = ns.ray if ns.ray is not None else bool(os.environ.get("RAY_ADDRESS"))
    return EvalOptions(
        model=model,
        tasks=tasks,
        lengths=lengths,
        block_length=ns.block_length,
        limit=ns.limit,
        data_dir=data_dir,
        out=Path(ns.out) if ns.out else default_out(model),
        prompt_format=ns.prompt_format,
        chat_template=ns.chat_template,
        use_ray=use_ray,
        workers=ns.workers,
        cpus_per_worker=ns.cpus_per_worker,
        gpus_per_worker=ns.gpus_per_worker,
        progress=not ns.no_progress,
        cfg=cfg,
    )


def load_problems(opts: EvalOptions) -> dict[str, list[Problem]]:
    """The test problems of every task (at most ``--limit`` each)."""
    out: dict[str, list[Problem]] = {}
    for task in opts.tasks:
        tcfg = dataclasses.replace(
            opts.cfg.task, name=task, data_dir=opts.data_dir, limit=opts.limit
        )
        try:
            out[task] = load_task(tcfg, tcfg.test_split)
        except FileNotFoundError as exc:
            raise UsageError(f"bad value for --data-dir: {exc}") from None
    return out


# --------------------------------------------------------------------------- evaluation


class RecordingScorer:
    """Scores like :func:`embr_rl.eval.correctness_scorer` and keeps every verifier
    :class:`Score` in call order (the outcome goes into the generations file)."""

    def __init__(self, cfg: VerifierConfig) -> None:
        self.cfg = cfg
        self.scorer = ProblemScorer(cfg)
        self.scores: list[Score] = []

    def __call__(self, completion: str, problem: Problem) -> float:
        from embr_rl.evaluation.evaluate import is_correct

        score = self.scorer.score(completion, problem)
        self.scores.append(score)
        return float(is_correct(score))


def _detail(score: Score) -> str | None:
    """The verifier's short reason: the extracted answer (math) or the test message (code)."""
    if "extracted" in score.info:
        value = score.info["extracted"]
        return None if value is None else str(value)
    message = score.info.get("message")
    return None if message is None else str(message)[:500]


def evaluate_shard(
    loaded: Any,
    problems: Sequence[Problem],
    *,
    length: int,
    eval_cfg: EvalConfig,
    prompt_format: str,
    chat_template: bool,
    verifier_cfg: VerifierConfig,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Decode and score ``problems`` at one length; one generations record per problem.

    Batches of ``eval_cfg.batch_size`` get seeds ``seed``, ``seed + 1``, ...; a shard that
    starts at batch ``k`` of a task is passed ``seed + k``, so a sharded run decodes exactly
    the batches, with exactly the seeds, of a local one."""
    from embr_rl.evaluation.evaluate import evaluate

    scorer = RecordingScorer(verifier_cfg)
    result = evaluate(
        loaded,
        problems,
        eval_cfg,
        prompt_format=prompt_format,
        chat_template=chat_template,
        scorer=scorer,
        seed=seed,
        progress=progress or (lambda n: None),
    )
    records = []
    for p, s, score in zip(problems, result.samples, scorer.scores, strict=True):
        records.append(
            {
                "id": p.id,
                "task": p.task,
                "length": length,
                "prompt": s["prompt"],
                "completion": s["completion"],
                "answer": p.answer,
                "correct": bool(s["reward"]),
                "verifier": p.verifier,
                "outcome": score.outcome,
                "detail": _detail(score),
            }
        )
    return records


def _jobs(opts: EvalOptions, problems: dict[str, list[Problem]]) -> list[tuple[str, int]]:
    return [(t, n) for t in opts.tasks for n in opts.lengths if problems[t]]


def run_local(
    opts: EvalOptions, problems: dict[str, list[Problem]], progress: Progress | None
) -> list[dict[str, Any]]:
    """Every task at every length in this process, with one model load."""
    from embr_rl.core.models.loader import load_model

    loaded = load_model(opts.cfg.model, opts.model)
    records: list[dict[str, Any]] = []
    for task, length in _jobs(opts, problems):
        fmt, chat = opts.prompt_settings(task)
        if progress is not None:
            progress.set_note(f"{task} L={length}")
            progress.advance(0, force=True)
        records += evaluate_shard(
            loaded,
            problems[task],
            length=length,
            eval_cfg=opts.eval_config(length),
            prompt_format=fmt,
            chat_template=chat,
            verifier_cfg=opts.cfg.verifier,
            seed=opts.cfg.seed,
            progress=progress.advance if progress is not None else None,
        )
    return records


def shard_bounds(num: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Split ``num`` problems into at most ``workers`` contiguous shards of whole batches
    (sizes differ by at most one batch); returns ``(start, end)`` pairs, none empty."""
    batches = -(-num // batch_size)
    parts = min(workers, batches)
    bounds, start_batch = [], 0
    for w in range(parts):
        count = batches // parts + (1 if w < batches % parts else 0)
        end_batch = start_batch + count
        bounds.append((start_batch * batch_size, min(num, end_batch * batch_size)))
        start_batch = end_batch
    return bounds


class EvalWorker:
    """A Ray actor body: loads the model once, then evaluates shards sent to it."""

    def __init__(self, model: str, model_cfg: ModelConfig) -> None:
        from embr_rl.core.models.loader import load_model
        from embr_rl.core.runtime import quiet_libraries

        quiet_libraries()
        self.loaded = load_model(model_cfg, model)

    def run(self, problems: Sequence[Problem], **kwargs: Any) -> list[dict[str, Any]]:
        """:func:`evaluate_shard` on this worker's model."""
        return evaluate_shard(self.loaded, problems, **kwargs)


def _init_ray(cfg: Config) -> Any:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or cfg.cluster.address
        if not address:
            from embr_rl.cluster import local_cluster_auth

            local_cluster_auth()
        ray.init(
            address=address,
            namespace=cfg.cluster.namespace,
            include_dashboard=False,
            log_to_driver=False,
        )
    return ray


def run_ray(
    opts: EvalOptions, problems: dict[str, list[Problem]], progress: Progress | None
) -> list[dict[str, Any]]:
    """The same evaluation split over ``opts.workers`` Ray actors; records in input order."""
    ray = _init_ray(opts.cfg)
    gpus = opts.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actor = ray.remote(num_cpus=opts.cpus_per_worker, num_gpus=gpus)(EvalWorker)
    workers = [actor.remote(opts.model, opts.cfg.model) for _ in range(opts.workers)]
    try:
        per_job: list[list[Any]] = []
        sizes: dict[Any, int] = {}
        for task, length in _jobs(opts, problems):
            fmt, chat = opts.prompt_settings(task)
            ecfg = opts.eval_config(length)
            refs = []
            bounds = shard_bounds(len(problems[task]), ecfg.batch_size, opts.workers)
            for worker, (start, end) in zip(workers, bounds):
                ref = worker.run.remote(
                    problems[task][start:end],
                    length=length,
                    eval_cfg=ecfg,
                    prompt_format=fmt,
                    chat_template=chat,
                    verifier_cfg=opts.cfg.verifier,
                    seed=opts.cfg.seed + start // ecfg.batch_size,
                )
                refs.append(ref)
                sizes[ref] = end - start
            per_job.append(refs)
        if progress is not None:
            progress.set_note(f"{len(workers)} Ray workers")
            progress.advance(0, force=True)
        pending = [r for refs in per_job for r in refs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # raise a worker's error now
            if progress is not None:
                progress.advance(sizes[done[0]])
        return [rec for refs in per_job for part in ray.get(refs) for rec in part]
    finally:
        for w in workers:
            ray.kill(w)


# --------------------------------------------------------------------------- outputs


def write_outputs(
    opts: EvalOptions, records: Sequence[dict[str, Any]], wall_s: float
) -> dict[str, Path]:
    """Write generations.jsonl, accuracy.md, accuracy.csv, summary.json (and the config)."""
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "generations": out / "generations.jsonl",
        "markdown": out / "accuracy.md",
        "csv": out / "accuracy.csv",
        "summary": out / "summary.json",
    }
    with open(paths["generations"], "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    cells = aggregate(records)
    ecfg = opts.eval_config(opts.lengths[0])
    mode = "exact" if ecfg.threshold is None and ecfg.cache is None else "fast"
    header = (
        f"Accuracy (%) of `{opts.model}`: temperature {ecfg.temperature:g}, block length "
        f"{opts.block_length}, steps = length/2, {mode} decoding"
        + (f", first {opts.limit} problems per task" if opts.limit else "")
        + ".\n\n"
    )
    paths["markdown"].write_text(header + render_markdown(cells))
    paths["csv"].write_text(render_csv(cells))
    summary = {
        "model": opts.model,
        "tasks": {
            t: dict(zip(("prompt_format", "chat_template"), opts.prompt_settings(t)))
            for t in opts.tasks
        },
        "lengths": opts.lengths,
        "block_length": opts.block_length,
        "steps": {str(n): n // 2 for n in opts.lengths},
        "limit": opts.limit,
        "data_dir": opts.data_dir,
        "decoding": {
            k: getattr(ecfg, k)
            for k in ("temperature", "batch_size", "threshold", "cache", "stop_at_eos")
        },
        "seed": opts.cfg.seed,
        "ray_workers": opts.workers if opts.use_ray else 0,
        "wall_seconds": round(wall_s, 1),
        "accuracy": [dataclasses.asdict(c) | {"accuracy": c.accuracy} for c in cells],
    }
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    save_config(opts.cfg, out)
    return paths


def run(opts: EvalOptions) -> dict[str, Path]:
    """Load the tasks, evaluate (locally or on Ray), write the outputs; return their paths."""
    from embr_rl.core.runtime import quiet_libraries

    quiet_libraries()
    t0 = time.perf_counter()
    problems = load_problems(opts)
    total = sum(len(problems[t]) for t, _ in _jobs(opts, problems))
    progress = Progress(total) if opts.progress else None
    try:
        runner = run_ray if opts.use_ray else run_local
        records = runner(opts, problems, progress)
    finally:
        if progress is not None:
            progress.close()
    paths = write_outputs(opts, records, time.perf_counter() - t0)
    print(paths["markdown"].read_text(), end="")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; exit status 0 ok, 2 usage or config error, 1 runtime error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0
    try:
        opts = parse_args(argv)
        run(opts)
    except (UsageError, ConfigError) as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        print(
            "usage: python -m embr_rl.eval MODEL --task TASKS --lengths L1,L2 [options]; "
            "see --help",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("eval: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"eval: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
