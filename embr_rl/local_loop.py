"""Algorithm 1 in one process, without Ray: rollout worker, buffer and learner as plain objects.

The sync mode of :mod:`embr_rl.driver` without actors: generate ``group_size`` completions
for ``prompts_per_batch`` prompts with the current policy, take ``algo.inner_iterations``
learner steps on them, copy the weights to the worker, repeat. With ``algo.mode=offline``
the buffer holds ``buffer.offline_path`` and a round is one learner step on it (the worker
only serves evaluation). Every random draw is seeded,
so a run is bit-reproducible. The RL sanity test and ``python -m embr_rl.local_loop`` (the
experiments in docs/results.md) use it; the distributed job (``python -m embr_rl.run``) does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from actors.rollout import RolloutWorker
from buffer.offline import load_offline
from buffer.replay import ExperienceBuffer
from embr_rl.core.config import Config
from embr_rl.core.experience import PairBatch
from embr_rl.core.models.loader import load_model
from embr_rl.core.tasks import Problem, load_task
from embr_rl.core.tasks.stream import PromptStream
from embr_rl.evaluation.evaluate import EvalResult, evaluate
from learner.learner import Learner, PolicySpec, init_distributed

__all__ = ["LocalLoop", "StepRecord"]


@dataclass
class StepRecord:
    """One learner step: the rollout batch's mean reward and the learner's metrics."""

    step: int
    samples: int
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)


class LocalLoop:
    """Rollouts, buffer and one learner rank in this process (``learner.num_ranks`` must be 1)."""

    def __init__(self, cfg: Config, *, problems: list[Problem] | None = None) -> None:
        if cfg.learner.num_ranks != 1:
            raise ValueError("LocalLoop runs one learner rank; set learner.num_ranks=1")
        self.cfg = cfg
        init_distributed(backend=cfg.learner.dist_backend)
        loaded = load_model(cfg.model, for_training=True)
        rollout_loaded = copy.copy(loaded)
        rollout_loaded.model = copy.deepcopy(loaded.model).eval()
        self.loaded = rollout_loaded
        spec = PolicySpec(
            loaded.model,
            loaded.mask_token_id,
            loaded.pad_token_id,
            loaded.eos_token_id,
            loaded.stop_token_ids,
        )
        self.learner = Learner(cfg.learner, cfg.algo, spec, lora=cfg.model.lora, seed=cfg.seed)
        self.worker = RolloutWorker.from_config(cfg, rollout_loaded, seed=cfg.seed)
        # As the driver's sync mode: only rows of the newest policy version are drawn.
        self.buffer = ExperienceBuffer(
            **ExperienceBuffer.config_kwargs(cfg.buffer, seed=cfg.seed, max_staleness=0)
        )
        self.offline = cfg.algo.mode == "offline"
        self.samples = 0
        if self.offline:
            self._load_offline()
        train = problems if problems is not None else load_task(cfg.task, cfg.task.train_split)
        self.stream = PromptStream(train, seed=cfg.seed)
        self.history: list[StepRecord] = []

    def _load_offline(self) -> None:
        b = self.cfg.buffer
        assert b.offline_path is not None  # config validation
        data = load_offline(
            b.offline_path,
            self.loaded.tokenizer,
            shape=b.offline_format,
            strict=b.strict,
            task=b.offline_task,
            cache_dir=b.offline_cache_dir,
        )
        self.buffer.add(data.table)
        # Offline, "samples" counts the dataset's rows: no sample is generated.
        self.samples = data.table.num_rows

    @property
    def step(self) -> int:
        """Learner steps taken (the policy version the worker holds after a round)."""
        return self.learner.step

    def _broadcast(self) -> None:
        state = {k: v.detach().clone() for k, v in self.learner.policy.state_dict().items()}
        self.worker.update_weights(state, self.step)
        self.buffer.set_policy_version(self.step)

    def round(self) -> list[StepRecord]:
        """One rollout batch, then ``algo.inner_iterations`` learner steps on it (offline: one
        learner step on the dataset, its batch's mean reward as the record's reward)."""
        if self.offline:
            batch = self.learner.sample_from(self.buffer)
            tables = [batch.first, batch.second] if isinstance(batch, PairBatch) else [batch]
            rewards = [x for t in tables for x in t.column("reward").to_pylist()]
            metrics = self.learner.train_step(batch)
            rec = StepRecord(self.step, self.samples, sum(rewards) / len(rewards), metrics)
            self._broadcast()
            self.history.append(rec)
            return [rec]
        rows = self.worker.generate(self.stream.take(self.cfg.rollout.prompts_per_batch))
        self.buffer.add(rows)
        reward = float(self.worker.metrics()["rollout/reward_mean"])
        self.samples += rows.num_rows
        out = []
        for _ in range(self.cfg.algo.inner_iterations):
            batch = self.learner.sample_from(self.buffer)
            metrics = self.learner.train_step(batch)
            out.append(StepRecord(self.step, self.samples, reward, metrics))
        self._broadcast()
        self.history.extend(out)
        return out

    def run(
        self,
        steps: int,
        *,
        until: Callable[[list[StepRecord]], bool] | None = None,
        log: Callable[[StepRecord], None] | None = None,
    ) -> list[StepRecord]:
        """Rounds until ``steps`` learner steps are done or ``until(history)`` holds."""
        while self.step < steps:
            for rec in self.round():
                if log is not None:
                    log(rec)
            if until is not None and until(self.history):
                break
        return self.history

    def evaluate(self, problems: list[Problem]) -> EvalResult:
        """Greedy accuracy of the current policy (the worker's copy) with ``cfg.eval``."""
        return evaluate(
            self.loaded,
            problems,
            self.cfg.eval,
            prompt_format=self.cfg.task.prompt_format,
            chat_template=self.cfg.task.chat_template,
        )

    def close(self) -> None:
        self.worker.close()
        self.learner.close()


if __name__ == "__main__":  # pragma: no cover - experiments from the command line
    import sys

    from embr_rl.core.config import load_config

    torch.set_num_threads(1)
    c = load_config(sys.argv[1], sys.argv[2:])
    loop = LocalLoop(c)
    loop.run(
        c.learner.total_steps,
        log=lambda r: print(
            f"step {r.step} reward {r.reward:.3f} loss {r.metrics.get('learner/loss', 0):.4g} "
            f"energy policy {r.metrics.get('learner/energy_policy', 0):.2f} "
            f"ref {r.metrics.get('learner/energy_ref', 0):.2f}",
            flush=True,
        ),
    )
    loop.close()
