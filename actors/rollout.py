"""The rollout worker: decode groups of completions, score them, emit buffer rows.

A plain class (``embr_rl/run.py`` wraps it with ``ray.remote``). It holds the policy
behind a :class:`~actors.engines.RolloutEngine` and the policy's weight version; for each
batch of problems it decodes ``group_size`` completions per prompt, scores them with the
problem's verifier on a bounded scoring pool, and returns the rows in the buffer's schema
(:data:`embr_rl.core.experience.SAMPLE_SCHEMA`). New weights are applied between batches, never
while a batch is being generated. With a :class:`BehaviourScorer` the rows also carry the
sampling policy's per-token log-probabilities (``behaviour_logp``), which d1's importance
ratios need when a row is trained on after the policy has moved.
"""

from __future__ import annotations

import copy
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import torch

from actors.engines import DecodeOptions, RolloutEngine, build_engine
from actors.verifiers import Score, Verifier
from actors.verifiers.pool import ProblemScorer, collect
from embr_rl.core.experience import empty_table, rows_from_dicts
from embr_rl.core.losses import (
    LossBatch,
    LossModels,
    d1_token_logprobs,
    reference_energies,
    traits_of,
    unigrpo_token_logprobs,
)
from embr_rl.core.masking import span_mask
from embr_rl.core.models.tokenizer import decode_completions
from embr_rl.core.tasks import Problem
from embr_rl.core.tasks.prompts import encode_problems
from embr_rl.core.transport import TransportSpec, WeightClient


def _left_padded(
    prompts: Sequence[Sequence[int]], completions: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(prompt [B, P], prompt attention [B, P] or None, full attention [B, P + L] or None)``
    for prompts left-padded as the learner pads them (None: no padding)."""
    width = max(len(p) for p in prompts)
    device = completions.device
    prompt = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if p:
            prompt[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attn[i, width - len(p) :] = 1
    if bool(attn.all()):
        return prompt, None, None
    full = torch.cat([attn, torch.ones_like(completions, dtype=attn.dtype)], dim=-1)
    return prompt, attn, full


def row_mask_seeds(base: int, num_groups: int, group_size: int, *, share: bool) -> list[int]:
    """One likelihood-mask seed per row of a batch (``base``: the batch's sampling seed),
    shared by a group's rows when ``share`` (``algo.pair_common_masks``), else one per row."""
    base = base % (1 << 40)
    return [
        ((base << 12) + g) << 8 | (0 if share else j)
        for g in range(num_groups)
        for j in range(group_size)
    ]


def _scoring_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: torch.Tensor,
    seeds: Sequence[int],
    algo: Any,
    *,
    mask_id: int,
    pad_id: int,
    eos_id: int | None,
    stop_ids: Sequence[int],
) -> LossBatch:
    """The rows as the learner will see them (left-padded prompts, the algo's span, seeded
    draws), scored by ``model``."""
    prompt, attn, _ = _left_padded(prompts, completions, pad_id)
    valid = torch.ones_like(completions, dtype=torch.bool)
    span = span_mask(
        completions, span=algo.likelihood_span, eos_id=eos_id, stop_ids=stop_ids, valid=valid
    )
    return LossBatch(
        prompt_ids=prompt,
        completion_ids=completions,
        rewards=torch.zeros(completions.shape[0]),
        group_ids=torch.zeros(completions.shape[0], dtype=torch.long),
        models=LossModels(policy=model, mask_id=mask_id),
        prompt_attention_mask=attn,
        completion_mask=None if bool(span.all()) else span,
        mask_seeds=torch.tensor(list(seeds), dtype=torch.long),
    )


class BehaviourScorer:
    """The sampling policy's log-probs of its own completions, scored right after decoding
    with the learner's estimator, so the learner's ratio ``pi_theta / pi_behaviour`` is 1 on
    fresh rows: d1's one-step per-token log-probs
    (:func:`embr_rl.core.losses.d1_token_logprobs`, no prompt masking), or, for UniGRPO and
    BGPO (``seeded``: per-draw ratios), the per-token log-probs of each of its ``algo.num_mc_samples`` draws on the
    row's seeded masks (:func:`embr_rl.core.losses.unigrpo_token_logprobs`), flattened."""

    def __init__(
        self,
        algo: Any,
        *,
        mask_id: int,
        pad_id: int,
        eos_id: int | None = None,
        stop_ids: Sequence[int] = (),
    ) -> None:
        self.algo = algo
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.stop_ids = tuple(stop_ids)
        traits = traits_of(algo.name)
        self.seeded = traits.draw_ratio
        self.group_masks = traits.group_masks and bool(algo.pair_common_masks)

    @torch.no_grad()
    def __call__(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        completions: torch.Tensor,
        seeds: Sequence[int] | None = None,
    ) -> list[list[float]]:
        """One list per row: ``completions.shape[1]`` log-probs, or ``n`` times that when
        ``seeded`` (then ``seeds``, the rows' ``mask_seed``, are required)."""
        was_training = model.training
        model.eval()
        try:
            if self.seeded:
                if seeds is None:
                    raise ValueError(
                        f"{self.algo.name}'s behaviour log-probs need the rows' mask seeds"
                    )
                batch = _scoring_batch(
                    model, prompts, completions, seeds, self.algo, mask_id=self.mask_id,
                    pad_id=self.pad_id, eos_id=self.eos_id, stop_ids=self.stop_ids,
                )  # fmt: skip
                logp, _ = unigrpo_token_logprobs(batch, self.algo, model)
                logp = logp.reshape(logp.shape[0], -1)
            else:
                prompt, _, full = _left_padded(prompts, completions, self.pad_id)
                logp = d1_token_logprobs(
                    model,
                    prompt,
                    completions,
                    self.algo,
                    mask_id=self.mask_id,
                    attention_mask=full,
                    prompt_masks=torch.zeros_like(prompt, dtype=torch.bool),
                )
        finally:
            model.train(was_training)
        return logp.float().cpu().tolist()


class ReferenceScorer:
    """The frozen reference's ELBO (and, for EMBR-U, EUBO) of each completion, scored once
    when it is made, on the mask draws of the row's ``mask_seed`` (issue 19: a learner step
    then runs the policy only; the learner draws the same masks from the seed, so common
    random numbers stay exact). ``reference`` is a copy of the initial weights, never updated.
    """

    def __init__(
        self,
        algo: Any,
        reference: torch.nn.Module,
        *,
        mask_id: int,
        pad_id: int,
        eos_id: int | None,
        stop_ids: Sequence[int],
    ) -> None:
        self.algo = algo
        self.reference = reference.eval().requires_grad_(False)
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.stop_ids = tuple(stop_ids)
        self.upper = traits_of(algo.name).upper_bound

    def seeds(self, base: int, num_groups: int, group_size: int) -> list[int]:
        """One seed per row: shared by a group's rows with ``algo.pair_common_masks`` (pairs
        then share their draws), else one per row; ``base`` is the batch's sampling seed."""
        return row_mask_seeds(base, num_groups, group_size, share=self.algo.pair_common_masks)

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[Sequence[int]], completions: torch.Tensor, seeds: Sequence[int]
    ) -> list[list[float]]:
        """``[ELBO]``, or ``[ELBO, EUBO]`` when the loss uses the EUBO, per row."""
        batch = _scoring_batch(
            self.reference, prompts, completions, seeds, self.algo, mask_id=self.mask_id,
            pad_id=self.pad_id, eos_id=self.eos_id, stop_ids=self.stop_ids,
        )  # fmt: skip
        lower, upper = reference_energies(batch, self.algo, upper=self.upper)
        terms = lower[:, None] if upper is None else torch.stack([lower, upper], dim=1)
        return terms.double().cpu().tolist()


class RolloutWorker:
    """Generates, scores and packs samples for the buffer; takes weight updates between batches.

    ``verifiers`` maps a problem's ``verifier`` name to a :class:`~actors.verifiers.Verifier`;
    names not given are built with :func:`actors.verifiers.build_verifier` from
    ``verifier_cfg`` on first use; a :class:`~actors.verifiers.pool.ProblemScorer` scores
    the completions, as in evaluation. ``seed`` makes the sampling of every batch
    reproducible.
    ``behaviour`` (None: not recorded) fills the rows' ``behaviour_logp`` column;
    ``reference`` (None: not scored) their ``mask_seed`` and ``ref_energies``.
    A completion's text is cut at its first stop id: ``eos_id`` (default: the tokenizer's)
    or one of ``stop_ids`` (end-of-turn ids such as ``<|eot_id|>``).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        options: DecodeOptions,
        *,
        group_size: int = 8,
        verifiers: Mapping[str, Verifier] | None = None,
        verifier_cfg: Any = None,
        num_scorers: int = 2,
        eos_id: int | None = None,
        stop_ids: Sequence[int] | None = None,
        prompt_format: str = "plain",
        chat_template: bool = False,
        max_prompt_length: int | None = None,
        worker_id: str = "rollout-0",
        seed: int = 0,
        policy_version: int = 0,
        behaviour: BehaviourScorer | None = None,
        reference: ReferenceScorer | None = None,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if num_scorers < 1:
            raise ValueError(f"num_scorers must be >= 1, got {num_scorers}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.options = options
        self.group_size = group_size
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.stop_ids = tuple(int(i) for i in stop_ids or ())
        self.prompt_format = prompt_format
        self.chat_template = chat_template
        self.max_prompt_length = max_prompt_length
        self.worker_id = worker_id
        self.seed = seed
        self._scorer = ProblemScorer(verifier_cfg, verifiers, max_workers=num_scorers)
        self._score_timeout_s: float | None = getattr(verifier_cfg, "score_timeout_s", None)
        self._version = policy_version
        self._batches = 0
        self._generating = threading.Lock()
        self._metrics: dict[str, float] = {}
        # The one weight path: broadcasts and in-process updates are staged here and
        # applied between batches through the engine's own update_weights.
        self._sync = WeightClient(engine, version=policy_version)
        self.behaviour = behaviour
        self.reference = reference
        if behaviour is not None and getattr(engine, "model", None) is None:
            raise TypeError(
                f"engine {type(engine).__name__} exposes no torch model to score behaviour "
                "log-probs with; rollout.record_logprobs needs rollout.engine=torch"
            )

    @staticmethod
    def config_args(
        cfg: Any, loaded: Any = None, *, worker_id: str = "rollout-0", seed: int | None = None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Constructor ``(args, kwargs)`` for the whole ``Config`` (``rollout``, ``task``,
        ``verifier``, ``model``); ``loaded`` is a ``LoadedModel`` (None: load ``cfg.model``)."""
        r = cfg.rollout
        if loaded is None:
            from embr_rl.core.models.loader import load_model
            from embr_rl.core.models.lora import for_inference

            loaded = load_model(cfg.model)
            loaded.model = for_inference(loaded.model, cfg.model.lora)
        engine = build_engine(
            r.engine,
            loaded=loaded,
            max_batch_size=r.max_batch_size or r.prompts_per_batch * r.group_size,
        )
        kwargs = dict(
            group_size=r.group_size,
            verifier_cfg=cfg.verifier,
            num_scorers=cfg.verifier.num_processes,
            eos_id=loaded.eos_token_id,
            stop_ids=loaded.stop_token_ids,
            prompt_format=cfg.task.prompt_format,
            chat_template=cfg.task.chat_template,
            worker_id=worker_id,
            seed=cfg.seed if seed is None else seed,
            behaviour=BehaviourScorer(
                cfg.algo,
                mask_id=loaded.mask_token_id,
                pad_id=loaded.pad_token_id,
                eos_id=loaded.eos_token_id,
                stop_ids=loaded.stop_token_ids,
            )
            if r.record_logprobs
            else None,
            reference=ReferenceScorer(
                cfg.algo,
                copy.deepcopy(loaded.model),
                mask_id=loaded.mask_token_id,
                pad_id=loaded.pad_token_id,
                eos_id=loaded.eos_token_id,
                stop_ids=loaded.stop_token_ids,
            )
            if r.score_reference
            else None,
        )
        return (engine, loaded.tokenizer, DecodeOptions.from_config(r)), kwargs

    @classmethod
    def from_config(
        cls, cfg: Any, loaded: Any = None, *, worker_id: str = "rollout-0", seed: int | None = None
    ) -> RolloutWorker:
        """A worker for the whole ``Config`` (see :meth:`config_args`)."""
        args, kwargs = cls.config_args(cfg, loaded, worker_id=worker_id, seed=seed)
        return cls(*args, **kwargs)

    @property
    def policy_version(self) -> int:
        """The version of the weights the next batch is generated with."""
        return self._sync.latest_version

    # ------------------------------------------------------------------ weight sync

    def connect_weights(self, spec: TransportSpec) -> None:
        """Join the learner's weight broadcast; the manifest is checked against the engine's
        ``weight_specs`` (see :class:`embr_rl.core.transport.WeightClient`)."""
        self._sync.connect(spec)

    def receive_weights(self, handle: Any, version: int) -> int:
        """Stage broadcast ``version``; applied now if idle, else after the running batch."""
        nbytes = self._sync.receive(handle, version)
        self._apply_if_idle()
        return nbytes

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Take in-process weights of ``version`` (no broadcast: the local loop) by the same
        path as a broadcast: staged, then applied now or after the running batch."""
        self._sync.stage(state_dict, version)
        self._apply_if_idle()

    def _apply_if_idle(self) -> None:
        if self._generating.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self._generating.release()

    def _apply_pending(self) -> None:
        version = self._sync.apply_pending()
        if version is not None:
            self._version = version

    def ping(self) -> dict[str, Any]:
        """Liveness and identity: pid, worker id, weight version, batches generated."""
        return {
            "pid": os.getpid(),
            "worker_id": self.worker_id,
            "policy_version": self._version,
            "batches": self._batches,
        }

    def generate_with_metrics(
        self, problems: Sequence[Problem]
    ) -> tuple[pa.Table, dict[str, float]]:
        """:meth:`generate` and the batch's metrics (two Ray return values for the driver)."""
        rows = self.generate(problems)
        return rows, self.metrics()

    def generate(self, problems: Sequence[Problem]) -> pa.Table:
        """``group_size`` scored completions per problem, as rows of the buffer schema."""
        if not problems:
            return empty_table()
        with self._generating:
            self._apply_pending()
            version = self._version
            batch = self._batches
            self._batches += 1
            t0 = time.perf_counter()
            _, prompts = encode_problems(
                problems,
                self.tokenizer,
                self.prompt_format,
                self.chat_template,
                self.max_prompt_length,
            )
            repeated = [ids for ids in prompts for _ in range(self.group_size)]
            out = self.engine.generate(repeated, self.options, seed=self.seed * 1_000_003 + batch)
            created = time.time()
            t_decode = time.perf_counter() - t0
            texts = decode_completions(
                self.tokenizer, out.completion_ids, self.eos_id, self.stop_ids
            )
            futures = [
                self._scorer.submit(text, problems[i // self.group_size])
                for i, text in enumerate(texts)
            ]
            behaviour: list[list[float]] | None = None
            t_behaviour = 0.0
            row_seeds: list[int] | None = None
            if self.behaviour is not None:
                t1 = time.perf_counter()
                if self.behaviour.seeded:
                    # UniGRPO draws one set of masks per row; BGPO a group's rows alike
                    # (with algo.pair_common_masks), as its learner shares them.
                    row_seeds = row_mask_seeds(
                        self.seed * 1_000_003 + batch, len(problems), self.group_size,
                        share=self.behaviour.group_masks,
                    )  # fmt: skip
                behaviour = self.behaviour(
                    self.engine.model,  # type: ignore[attr-defined]
                    repeated,
                    out.completion_ids,
                    row_seeds,
                )
                t_behaviour = time.perf_counter() - t1
            cached: tuple[list[int], list[list[float]]] | None = None
            t_reference = 0.0
            if self.reference is not None:
                t1 = time.perf_counter()
                seeds = self.reference.seeds(
                    self.seed * 1_000_003 + batch, len(problems), self.group_size
                )
                cached = (seeds, self.reference(repeated, out.completion_ids, seeds))
                t_reference = time.perf_counter() - t1
            scores: list[Score] = collect(futures, self._score_timeout_s)
            t_score = time.perf_counter() - t0 - t_decode - t_behaviour - t_reference
        nonce = uuid.uuid4().hex[:12]
        rows = []
        for i, (ids, score) in enumerate(zip(out.completion_ids.tolist(), scores, strict=True)):
            p, j = problems[i // self.group_size], i % self.group_size
            # The learner numbers groups in sorted order of this id: the worker and batch
            # come before the random nonce, so two workers' groups sort the same every run.
            group = f"{self.worker_id}-{batch}-{nonce}-{i // self.group_size}"
            rows.append(
                {
                    "sample_id": f"{group}-{j}",
                    "prompt_id": p.id,
                    "prompt_ids": prompts[i // self.group_size],
                    "completion_ids": ids,
                    "reward": float(score.reward),
                    "reward_components": {k: float(v) for k, v in score.components.items()},
                    "verifier_status": score.outcome,
                    "policy_version": version,
                    "group_id": group,
                    "task": p.task,
                    "created_at": created,
                }
            )
            if behaviour is not None:
                rows[-1]["behaviour_logp"] = behaviour[i]
            if row_seeds is not None:
                rows[-1]["mask_seed"] = row_seeds[i]
            if cached is not None:
                rows[-1]["mask_seed"] = cached[0][i]
                rows[-1]["ref_energies"] = cached[1][i]
        self._record(out.stats, scores, t_decode, t_score, version, [p.task for p in problems])
        if behaviour is not None:
            self._metrics["rollout/behaviour_logp_s"] = t_behaviour
        if cached is not None:
            self._metrics["rollout/reference_s"] = t_reference
        return rows_from_dicts(rows)

    def _record(
        self,
        stats: Any,
        scores: list[Score],
        t_decode: float,
        t_score: float,
        version: int,
        tasks: list[str],
    ) -> None:
        rewards = [s.reward for s in scores]
        by_task: dict[str, list[float]] = {}
        for i, r in enumerate(rewards):
            by_task.setdefault(tasks[i // self.group_size], []).append(r)
        g = self.group_size
        groups = [rewards[i : i + g] for i in range(0, len(rewards), g)]
        self._metrics = {
            "rollout/samples": float(len(rewards)),
            "rollout/reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
            "rollout/mixed_group_share": (
                sum(len(set(gr)) > 1 for gr in groups) / len(groups) if groups else 0.0
            ),
            "rollout/decode_s": t_decode,
            "rollout/score_s": t_score,
            "rollout/forward_passes": float(stats.forward_passes),
            "rollout/tokens_per_s": stats.tokens_per_s,
            "rollout/policy_version": float(version),
            "rollout/verifier_errors": float(sum(s.outcome == "error" for s in scores)),
        }
        for task, rs in by_task.items():
            self._metrics[f"rollout/reward_mean/{task}"] = sum(rs) / len(rs)

    def metrics(self) -> dict[str, float]:
        """Metrics of the last batch, namespaced ``rollout/...``."""
        return dict(self._metrics)

    def close(self) -> None:
        """Stop the scoring pools."""
        self._scorer.close()


class ConfiguredRolloutWorker(RolloutWorker):
    """A :class:`RolloutWorker` built inside its own process from the run's ``Config``
    (what ``embr_rl/run.py`` turns into a Ray actor): sets the torch thread count, loads the
    model from ``cfg.model.path`` and seeds sampling with ``seed``."""

    def __init__(
        self, cfg: Any, *, worker_id: str, seed: int, num_threads: int | None = None
    ) -> None:
        from embr_rl.core.runtime import quiet_libraries

        quiet_libraries()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        args, kwargs = RolloutWorker.config_args(cfg, worker_id=worker_id, seed=seed)
        super().__init__(*args, **kwargs)
