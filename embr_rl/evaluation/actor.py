"""The evaluator: held-out accuracy of the current policy at temperature 0.

A plain class (``embr_rl/run.py`` makes it a Ray actor). It joins the learner's weight
broadcast like a rollout worker and by the same path (a staged update goes through its
torch engine's ``update_weights``), but applies a received update only when an evaluation
starts, so an evaluation never mixes two policy versions.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from embr_rl.core.transport import TransportSpec, WeightClient


class Evaluator:
    """Decodes the task's test problems with ``cfg.eval`` settings and scores correctness."""

    def __init__(
        self,
        cfg: Any,
        model_path: str,
        *,
        num_threads: int | None = None,
        run_dir: str | None = None,
    ) -> None:
        import torch

        from actors.engines import build_engine
        from embr_rl.core.models.loader import load_model
        from embr_rl.core.models.lora import for_inference
        from embr_rl.core.runtime import quiet_libraries
        from embr_rl.core.tasks import load_task
        from embr_rl.evaluation.evaluate import correctness_scorer

        quiet_libraries()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.cfg = cfg
        self.loaded = load_model(cfg.model, model_path)
        self.loaded.model = for_inference(self.loaded.model, cfg.model.lora)
        problems = load_task(cfg.task, cfg.task.test_split)
        self.problems = problems[: cfg.eval.limit] if cfg.eval.limit is not None else problems
        self.scorer = correctness_scorer(cfg.verifier)
        # The weights the evaluation decodes with: evaluate() runs the same module.
        self.engine = build_engine("torch", loaded=self.loaded)
        self.version = 0
        self.sync = WeightClient(self.engine, version=self.version)
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def connect_weights(self, spec: TransportSpec) -> None:
        self.sync.connect(spec)

    def receive_weights(self, handle: Any, version: int) -> int:
        """Stage ``version``; it is applied when the next evaluation starts."""
        return self.sync.receive(handle, version)

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "policy_version": self.version}

    def evaluate(self, step: int, *, final: bool = False) -> dict[str, Any]:
        """Accuracy of the newest received weights; samples go to ``<run_dir>/eval/``."""
        from embr_rl.evaluation.evaluate import evaluate

        applied = self.sync.apply_pending()
        if applied is not None:
            self.version = applied
        t0 = time.perf_counter()
        group_key = "num_operands" if self.cfg.task.name == "arith" else None
        result = evaluate(
            self.loaded,
            self.problems,
            self.cfg.eval,
            prompt_format=self.cfg.task.prompt_format,
            chat_template=self.cfg.task.chat_template,
            scorer=self.scorer,
            group_key=group_key,
            seed=self.cfg.seed,
        )
        seconds = time.perf_counter() - t0
        if self.run_dir is not None:
            out = self.run_dir / "eval"
            out.mkdir(parents=True, exist_ok=True)
            name = "final" if final else f"step_{step:08d}"
            with open(out / f"{name}.jsonl", "w") as fh:
                for s in result.samples:
                    fh.write(json.dumps(s) + "\n")
        metrics: dict[str, Any] = {
            "eval/accuracy": result.accuracy,
            "eval/num": float(result.num),
            "eval/policy_version": float(self.version),
            "eval/seconds": seconds,
            "eval/tokens_per_s": result.stats.tokens_per_s,
        }
        for group, acc in result.by_group.items():
            metrics[f"eval/accuracy/{group_key}={group}"] = acc
        metrics["samples"] = result.samples[: self.cfg.eval.num_show]
        return metrics
