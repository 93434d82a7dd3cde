"""The main job: ``python -m embr_rl.run CONFIG.yaml [key=value ...]``.

Loads and validates the config (a bad key, type or value exits with status 2 and a
message naming it), writes the resolved config to the run directory, and runs the stages
that exist so far:

1. base model: for ``model.path=builtin`` the built-in model is pre-trained once on the
   synthetic task and cached under ``<run_dir>/<pretrain.output_dir>``; otherwise the model
   at ``model.path`` is loaded;
2. evaluation of the base model on the task's held-out problems (accuracy and samples).

The distributed RL loop (rollout workers, buffer, learner group) grows here in later work;
this module is the only place that will make Ray actors.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from embr_rl.cli import quiet_libraries
from embr_rl.config import Config, ConfigError, load_config, save_config
from embr_rl.eval import correctness_scorer, evaluate
from embr_rl.models.loader import ModelLoadError, load_model
from embr_rl.pretrain import base_model_dir, is_trained, pretrain, report
from embr_rl.tasks import load_task

USAGE = "usage: python -m embr_rl.run CONFIG.yaml [key=value ...]"


def _log(msg: str) -> None:
    print(f"[run] {msg}", flush=True)


def base_model_stage(cfg: Config) -> str:
    """The path of the model to start from, pre-training the built-in one when needed."""
    if cfg.model.path != "builtin":
        return cfg.model.path
    path = base_model_dir(cfg)
    if is_trained(path):
        _log(f"base model: cached at {path}")
    else:
        _log(
            f"base model: none at {path}; pre-training it (pretrain.time_budget_s={cfg.pretrain.time_budget_s:g})"
        )
        pretrain(cfg)
    return str(path)


def run(cfg: Config) -> dict[str, object]:
    """Run every stage that exists; returns the summary written to ``summary.json``."""
    t0 = time.perf_counter()
    run_dir = Path(cfg.logging.run_dir)
    save_config(cfg, run_dir)
    _log(f"run directory {run_dir} (resolved config in {run_dir / 'config.yaml'})")
    model_path = base_model_stage(cfg)
    loaded = load_model(cfg.model, model_path)
    problems = load_task(cfg.task, cfg.task.test_split)
    if cfg.eval.limit is not None:
        problems = problems[: cfg.eval.limit]
    _log(
        f"evaluating {model_path} on {len(problems)} held-out {cfg.task.name} problems (temperature {cfg.eval.temperature:g})"
    )
    group_key = "num_operands" if cfg.task.name == "arith" else None
    result = evaluate(
        loaded,
        problems,
        cfg.eval,
        prompt_format=cfg.task.prompt_format,
        chat_template=cfg.task.chat_template,
        scorer=correctness_scorer(cfg.verifier),
        group_key=group_key,
        seed=cfg.seed,
    )
    report(result, cfg.eval.num_show)
    with open(run_dir / "eval_base_samples.jsonl", "w") as fh:
        for s in result.samples:
            fh.write(json.dumps(s) + "\n")
    summary: dict[str, object] = {
        "model": model_path,
        "task": cfg.task.name,
        "eval/accuracy": result.accuracy,
        "eval/accuracy_by_group": result.by_group,
        "eval/num": result.num,
        "eval/tokens_per_s": result.stats.tokens_per_s,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _log(
        f"done in {summary['wall_seconds']}s; the RL stages (rollout workers, buffer, learner) "
        "are not wired into this command yet"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    quiet_libraries()
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except (ModelLoadError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
