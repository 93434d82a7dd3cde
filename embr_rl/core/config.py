"""One structured configuration for every entry point.

A run is described by :class:`Config`: one dataclass per role (``model``, ``task``,
``rollout``, ``verifier``, ``buffer``, ``learner``, ``algo``, ``cluster``, ``eval``,
``logging``, ``checkpoint``, ``pretrain``). :func:`load_config` merges the schema's
defaults, a YAML file and ``key=value`` overrides with OmegaConf, then validates the
result once. Every problem is reported as a :class:`ConfigError` whose message names the
dotted key, the bad value and what is allowed.

Ranges and choices live next to each field (see :func:`field_`), so the schema is the
single place that says what a valid value is.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and what is allowed."""


def field_(
    default: Any = dataclasses.MISSING,
    *,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    help: str = "",
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field carrying its validation rule (choices and/or numeric bounds)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- roles


@dataclass
class BuiltinModelConfig:
    """Architecture of the built-in masked-diffusion transformer (used when building from scratch)."""

    hidden_size: int = field_(128, ge=8)
    num_layers: int = field_(4, ge=1)
    num_heads: int = field_(4, ge=1)
    intermediate_size: int = field_(384, ge=8)
    max_position_embeddings: int = field_(256, ge=8)
    rope_theta: float = field_(10000.0, gt=0)
    dropout: float = field_(0.0, ge=0, lt=1)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = field_(16, ge=1)
    alpha: int = field_(32, ge=1)
    dropout: float = field_(0.05, ge=0, lt=1)
    target_modules: list[str] = field_(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    """Which model to post-train and how to hold it."""

    # "builtin" builds the built-in transformer from ``builtin``; anything else is a
    # Hugging Face hub id or a local directory (e.g. GSAI-ML/LLaDA-8B-Instruct).
    path: str = "builtin"
    # A hub commit, tag or branch to load model.path at (its tokenizer too, unless
    # model.tokenizer names another); pin a commit for a reproducible run (null: the default
    # branch; ignored for local folders).
    revision: str | None = None
    tokenizer: str | None = None
    # "auto": the project's own implementation where one exists for the checkpoint's
    # model_type (llada, Dream; embr_rl.core.models.native), else transformers' Auto classes.
    # "native" insists on the own one; "remote" runs the checkpoint's shipped code
    # (needs trust_remote_code).
    implementation: str = field_("auto", choices=["auto", "native", "remote"])
    trust_remote_code: bool = False
    # Token ids that end a completion besides the tokenizer's EOS (null: EOS plus the
    # end-of-turn tokens the vocabulary has, e.g. LLaDA's <|eot_id|>, Qwen's <|im_end|>).
    stop_token_ids: list[int] | None = None
    mask_token_id: int | None = field_(None, ge=0)
    dtype: str = field_("auto", choices=["auto", "float32", "bfloat16", "float16"])
    device: str = field_("auto", choices=["auto", "cpu", "cuda"])
    gradient_checkpointing: bool = False
    builtin: BuiltinModelConfig = field_(factory=BuiltinModelConfig)
    lora: LoraConfig = field_(factory=LoraConfig)


@dataclass
class ArithConfig:
    """The synthetic arithmetic task (generated, no downloads)."""

    min_operands: int = field_(2, ge=2, le=6)
    max_operands: int = field_(3, ge=2, le=6)
    max_operand: int = field_(19, ge=1)
    ops: list[str] = field_(factory=lambda: ["+", "-"])
    # False: every intermediate result of a chain of + and - stays >= 0.
    allow_negative: bool = False
    num_train: int = field_(200000, ge=1)
    num_test: int = field_(500, ge=1)
    # Split "validation": hyper-parameter sweeps score here (bench/sweep.py), never on test.
    num_validation: int = field_(500, ge=1)
    seed: int = 1234


@dataclass
class TaskConfig:
    name: str = field_("arith", choices=["arith", "gsm8k", "math500", "humaneval"])
    # A local folder holding the benchmark files; None loads from the Hugging Face Hub.
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    prompt_format: str = field_("plain", choices=["plain", "d1"])
    chat_template: bool = False
    limit: int | None = field_(None, ge=1)
    arith: ArithConfig = field_(factory=ArithConfig)


@dataclass
class RolloutConfig:
    engine: str = field_("torch", choices=["torch", "vllm"])
    num_workers: int = field_(1, ge=0)
    num_cpus_per_worker: float = field_(1.0, ge=0)
    num_gpus_per_worker: float = field_(0.0, ge=0)
    prompts_per_batch: int = field_(8, ge=1)
    group_size: int = field_(8, ge=1)
    temperature: float = field_(0.9, ge=0)
    gen_length: int = field_(32, ge=1)
    block_length: int = field_(8, ge=1)
    steps: int = field_(16, ge=1)
    remasking: str = field_("low_confidence", choices=["low_confidence", "random"])
    threshold: float | None = field_(None, gt=0, le=1)
    cache: str | None = field_(None, choices=[None, "prefix", "dual"])
    cfg_scale: float = field_(0.0, ge=0)
    suppress_eos: bool = False
    # Fast mode: a row whose finished block is all EOS gets EOS to the end and stops decoding.
    stop_at_eos: bool = False
    # Continuous batching (torch engine): a worker's rows share max-batch slots, each at its
    # own block; a finished row's slot takes the next prompt at once (docs/decoding.md).
    continuous_batching: bool = False
    # Rows one decoder forward holds at most (the slots with continuous batching); None: the
    # whole batch, prompts_per_batch * group_size.
    max_batch_size: int | None = field_(None, ge=1)
    # Ray restarts a dead worker this many times (it then gets the current weights again).
    max_restarts: int = field_(3, ge=0)
    # Store the sampling policy's per-token log-probs with every row (d1's one-step estimate,
    # one extra forward per block per batch): d1's importance ratios on stale rows
    # (algo.inner_iterations > 1, online staleness) are then to the policy that drew them.
    record_logprobs: bool = False
    # Score the frozen reference's ELBO (EUBO for embr_u) of every row once, here, on the
    # row's own seeded mask draws, and store it with the row: the learner then runs the policy
    # only (a copy of the initial weights stays in each worker). EMBR losses only.
    score_reference: bool = False


@dataclass
class CodeVerifierConfig:
    """Sandboxed code execution (see docs/verifiers.md)."""

    reward: str = field_("binary", choices=["binary", "fraction"])
    timeout_s: float = field_(10.0, gt=0)
    sandbox: str = field_("auto", choices=["auto", "bwrap", "unshare", "rlimit"])
    require_isolation: bool = False
    memory_mb: int = field_(1024, ge=64)
    max_processes: int = field_(32, ge=2)
    max_file_mb: int = field_(16, ge=1)
    max_open_files: int = field_(64, ge=16)
    tmpfs_mb: int = field_(64, ge=1)
    max_output_chars: int = field_(4096, ge=0)


@dataclass
class VerifierConfig:
    reward: str = field_(
        "correct_only",
        choices=["correct_only", "d1_gsm8k", "d1_math", "even_answer", "consistent_answer"],
    )
    math_timeout_s: float = field_(5.0, gt=0)
    # A rollout batch's scorings share this deadline; a sample not scored by then counts as
    # outcome "timeout" with reward 0 (docs/verifiers.md).
    score_timeout_s: float = field_(120.0, gt=0)
    num_processes: int = field_(2, ge=1)
    code: CodeVerifierConfig = field_(factory=CodeVerifierConfig)


@dataclass
class BufferConfig:
    capacity: int = field_(50000, ge=1)
    eviction: str = field_("fifo", choices=["fifo", "reservoir"])
    sampling: str = field_("uniform", choices=["uniform", "recency"])
    recency_half_life: float = field_(1000.0, gt=0)
    max_staleness: int | None = field_(None, ge=0)
    snapshot_every_s: float = field_(300.0, gt=0)
    # None: snapshots go to <logging.run_dir>/buffer (chosen by embr_rl.run).
    snapshot_dir: str | None = None
    snapshot_keep: int = field_(2, ge=1)
    storage: str = field_("parquet", choices=["parquet"])
    # Producers pause while more than this many learner steps' worth of rows wait unread
    # (fractions allowed: 0.5 pauses a worker once half a step is waiting).
    max_lag: float = field_(4.0, gt=0)
    offline_path: str | None = None
    offline_format: str = field_("auto", choices=["auto", "scored", "pairs"])
    # None: tokenised offline datasets are cached next to the dataset file.
    offline_cache_dir: str | None = None
    offline_task: str = "offline"
    strict: bool = False
    # The learner's first step waits for this many eligible rows (None: learner.batch_size).
    min_size: int | None = field_(None, ge=1)


@dataclass
class LearnerConfig:
    num_ranks: int = field_(1, ge=1)
    num_cpus_per_rank: float = field_(1.0, ge=0)
    # Torch threads per rank (None: num_cpus_per_rank, at least 1). More threads than the
    # reservation pay off only while nothing else computes, e.g. algo.mode=sync, where the
    # workers wait during a learner step.
    num_threads: int | None = field_(None, ge=1)
    num_gpus_per_rank: float = field_(0.0, ge=0)
    zero_stage: int = field_(0, ge=0, le=3)
    precision: str = field_("auto", choices=["auto", "fp32", "bf16"])
    lr: float = field_(1e-5, gt=0)
    weight_decay: float = field_(0.0, ge=0)
    adam_betas: list[float] = field_(factory=lambda: [0.9, 0.99])
    adam_eps: float = field_(1e-8, gt=0)
    warmup_steps: int = field_(0, ge=0)
    lr_schedule: str = field_("constant", choices=["constant", "cosine", "linear"])
    max_grad_norm: float = field_(1.0, gt=0)
    batch_size: int = field_(64, ge=1)
    micro_batch_size: int = field_(8, ge=1)
    total_steps: int = field_(100, ge=1)
    # Weight transport to the workers (embr_rl/core/transport*.py): shared_memory and cuda_ipc
    # need every receiver on learner rank 0's node; torch_dist and object_store go anywhere.
    broadcast: str = field_(
        "torch_dist", choices=["torch_dist", "object_store", "shared_memory", "cuda_ipc"]
    )
    sync_every: int = field_(1, ge=1)
    bucket_mb: float = field_(256.0, gt=0)
    # Learner ranks' process group and the weight-sync group; "auto": NCCL on GPU, else gloo.
    dist_backend: str = field_("auto", choices=["auto", "gloo", "nccl"])
    sync_backend: str = field_("auto", choices=["auto", "gloo", "nccl"])
    sync_timeout_s: float = field_(300.0, gt=0)
    placement_strategy: str = field_("PACK", choices=["PACK", "STRICT_PACK", "SPREAD"])


# The reference-KL estimators of d1's, UniGRPO's and wd1's terms (embr_rl.core.losses.kl_penalty).
KL_ESTIMATORS = ("k3", "k2")


@dataclass
class AlgoConfig:
    name: str = field_(
        "embr_c",
        choices=[
            "embr_e",
            "embr_c",
            "embr_u",
            "d1",
            "wd1",
            "unigrpo",
            "spg",
            "bgpo",
            "dpo",
            "vrpo",
        ],
    )
    mode: str = field_("online", choices=["online", "sync", "offline"])
    beta: float = field_(0.05, gt=0)
    # With "block" masking each draw scores one decoding block, stratified over the draws:
    # a multiple of the number of blocks (rollout.gen_length / block_length, 4 in the demo)
    # scores every block of every completion in every step.
    num_mc_samples: int = field_(4, ge=1)
    eubo_gamma: float = field_(1.5, ge=1)
    # SPG's blend for negative-advantage responses: mix * EUBO + (1 - mix) * ELBO (1: SPG w/
    # EUBO; SPG's paper fixes its omega as a hyper-parameter, the default here is ours).
    spg_mix: float = field_(0.5, ge=0, le=1)
    # EMBR-U's EUBO (docs/objectives.md). "direct": SPG's tractable form, whose one-draw
    # terms carry a slack log(weight)/gamma (its bracket is mostly that slack); "gap": the ELBO
    # plus the self-normalised Jensen gap, never below the ELBO and 0 at a position scored by
    # one draw only (with block masking a bracket needs >= 2 draws per block).
    eubo_estimator: str = field_("direct", choices=["direct", "gap"])
    # "count" (l ~ U{1..L}, weight L/l) has finite variance; "uniform" (1/t) does not.
    timesteps: str = field_("count", choices=["uniform", "count"])
    stratified: bool = True
    # Complementary pairs of draws: with "block" masking both draws of a pair score the same
    # block and together mask all of it (EMBR-U's bracket then inverts less, docs/objectives.md).
    antithetic: bool = False
    common_random_numbers: bool = True
    # Pair losses (embr_c, embr_u): both completions of a pair are scored on the same masks,
    # so the tokens they share cancel in L(y) - L(y') instead of adding noise.
    pair_common_masks: bool = True
    length_normalize: bool = False
    likelihood_span: str = field_("window", choices=["window", "until_eos"])
    # Which states the likelihood is scored in. "block": the semi-autoregressive sampler's
    # (blocks before the scored one clean, later ones masked: SPG's block-wise masking; d1's
    # one-step estimate per block). "random": masks over the whole window (d1's original
    # fully-masked estimate), which trains conditionals the block sampler never uses.
    masking: str = field_("block", choices=["block", "random"])
    # The decoding block the "block" masking follows; None: rollout.block_length (filled in
    # by load_config; a bare AlgoConfig() with None scores the window as one block).
    block_length: int | None = field_(None, ge=1)
    reward_norm: str = field_("none", choices=["none", "center", "scale"])
    value_head_hidden: int = field_(64, ge=1)
    inner_iterations: int = field_(1, ge=1)
    # d1's random prompt masking (0.15 in its paper, with 12 inner iterations per batch).
    # 0 by default: with one learner step per batch it corrupts what the completion answers
    # (an operand of the arithmetic task), and d1 learnt the sanity reward only without it.
    prompt_mask_prob: float = field_(0.0, ge=0, le=1)
    clip_eps: float = field_(0.2, gt=0)
    # The reference anchor of d1 and UniGRPO (their papers'), and of wd1 and SPG (ours: both
    # papers have none, and without it their negative terms collapse the likelihood of their
    # own samples, docs/results.md); 0 turns it off.
    kl_coef: float = field_(0.04, ge=0)
    # The KL estimate of that anchor (core/losses.py kl_penalty). None: the loss's own, k3 for
    # d1 (its paper's), k2 for UniGRPO (ours: k3's gradient is the forward KL's and spiked on
    # UniGRPO's masked tokens, docs/results.md), k2 for wd1 and SPG (per token; SPG refuses k3).
    kl_estimator: str | None = field_(None, choices=[None, *KL_ESTIMATORS])
    micro_batch: int = field_(16, ge=1)
    # EMBR-E: stop c_phi's regression from shaping the policy's features (paper eq. 11 gradient).
    energy_head_detach: bool = True


@dataclass
class ClusterConfig:
    # None: join the cluster named by RAY_ADDRESS (as under `ray job submit`) or start a local one.
    address: str | None = None
    num_cpus: int | None = field_(None, ge=1)
    num_gpus: int | None = field_(None, ge=0)
    namespace: str = "embr_rl"
    # A cluster started by the run itself (no address): serve the dashboard on this host/port.
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = field_(8265, ge=1, le=65535)


@dataclass
class EvalConfig:
    every: int = field_(20, ge=0)
    limit: int | None = field_(None, ge=1)
    batch_size: int = field_(64, ge=1)
    temperature: float = field_(0.0, ge=0)
    gen_length: int = field_(32, ge=1)
    block_length: int = field_(8, ge=1)
    steps: int = field_(16, ge=1)
    # Fast decoding modes (actors/decoding.py); None/None/False is LLaDA's exact algorithm.
    threshold: float | None = field_(None, gt=0, le=1)
    cache: str | None = field_(None, choices=[None, "prefix", "dual"])
    stop_at_eos: bool = False
    # Continuous batching over batch_size slots (docs/decoding.md); the in-run evaluator
    # decodes all problems in one call, the CLI 8 x batch_size at a time for its progress line.
    continuous_batching: bool = False
    num_show: int = field_(3, ge=0)
    # Evaluate the starting policy before the first learner step (the "before" number).
    at_start: bool = True
    # The evaluator actor's resources.
    num_cpus: float = field_(0.0, ge=0)
    num_gpus: float = field_(0.0, ge=0)


@dataclass
class LoggingConfig:
    run_dir: str = "runs/${name}"
    log_every: int = field_(1, ge=1)
    tensorboard: bool = True
    jsonl: bool = True
    progress: str = field_("auto", choices=["auto", "always", "never"])
    # ray.util.metrics gauges/counters (the dashboard's Prometheus endpoint, names ray_embr_*).
    ray_metrics: bool = True
    # reward.png (training reward and eval accuracy against step) at the end of a run.
    plot: bool = True


@dataclass
class CheckpointConfig:
    every: int = field_(50, ge=0)
    resume: str = "auto"  # "auto", "never", or a checkpoint directory
    keep_last: int = field_(2, ge=1)


@dataclass
class PretrainConfig:
    """Masked-diffusion pre-training of the built-in model (the demo's base-model stage)."""

    # Where the trained base model is cached; relative paths are under logging.run_dir.
    output_dir: str = "base_model"
    # A fixed number of optimiser steps (no clock budget): the same seed gives the same model.
    max_steps: int = field_(2400, ge=1)
    batch_size: int = field_(128, ge=1)
    lr: float = field_(1e-3, gt=0)
    weight_decay: float = field_(0.01, ge=0)
    warmup_steps: int = field_(100, ge=0)
    # "count" (l ~ U{1..L}, weight L/l) keeps gradients bounded; "uniform" (1/t) does not.
    timesteps: str = field_("count", choices=["uniform", "count"])
    max_grad_norm: float = field_(1.0, gt=0)
    # Greedy accuracy on 64 test problems every this many steps (0: only at the end).
    eval_every: int = field_(0, ge=0)
    # The known error mode the demo's RL removes: this share of the pre-training solutions
    # box a wrong final answer (the last step's result plus one); their steps stay correct.
    wrong_answer_share: float = field_(0.0, ge=0, le=1)
    prompt_length: int = field_(16, ge=1)
    answer_length: int = field_(32, ge=1)
    num_threads: int | None = field_(None, ge=1)


@dataclass
class Config:
    name: str = "demo"
    seed: int = 0
    model: ModelConfig = field_(factory=ModelConfig)
    task: TaskConfig = field_(factory=TaskConfig)
    rollout: RolloutConfig = field_(factory=RolloutConfig)
    verifier: VerifierConfig = field_(factory=VerifierConfig)
    buffer: BufferConfig = field_(factory=BufferConfig)
    learner: LearnerConfig = field_(factory=LearnerConfig)
    algo: AlgoConfig = field_(factory=AlgoConfig)
    cluster: ClusterConfig = field_(factory=ClusterConfig)
    eval: EvalConfig = field_(factory=EvalConfig)
    logging: LoggingConfig = field_(factory=LoggingConfig)
    checkpoint: CheckpointConfig = field_(factory=CheckpointConfig)
    pretrain: PretrainConfig = field_(factory=PretrainConfig)


# --------------------------------------------------------------------------- loading


def _allowed_keys(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _schema_at(path: Sequence[str]) -> Any:
    node: Any = Config
    for part in path:
        fields = (
            {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        )
        if part not in fields:
            return None
        node = fields[part].type
        node = _resolve_type(node)
    return node


def _resolve_type(tp: Any) -> Any:
    if isinstance(tp, str):  # from __future__ annotations
        return globals().get(tp, tp)
    return tp


def _translate(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one message naming key, value and what is allowed."""
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    name = type(exc).__name__
    if name == "ConfigKeyError" or "not in struct" in msg or ("Key '" in msg and "not in" in msg):
        parts = key.split(".")
        parent = _schema_at(parts[:-1])
        allowed = _allowed_keys(parent)
        close = difflib.get_close_matches(parts[-1], allowed, n=1)
        hint = f" (did you mean '{'.'.join([*parts[:-1], close[0]])}'?)" if close else ""
        where = ".".join(parts[:-1]) or "the top level"
        return ConfigError(
            f"{source}: unknown key '{key}'{hint}; allowed keys in {where}: {', '.join(allowed)}"
        )
    value = getattr(exc, "value", None) if hasattr(exc, "value") else None
    tp = getattr(exc, "ref_type_str", None) or getattr(exc, "object_type_str", None)
    parts = key.split(".")
    parent = _schema_at(parts[:-1])
    expected = ""
    if dataclasses.is_dataclass(parent):
        f = {f.name: f for f in dataclasses.fields(parent)}.get(parts[-1])
        if f is not None:
            expected = str(f.type)
    detail = msg
    return ConfigError(
        f"{source}: bad value for '{key}'"
        + (f": {value!r}" if value is not None else "")
        + (f"; expected type {expected}" if expected else (f"; expected {tp}" if tp else ""))
        + f" ({detail})"
    )


def _check_ranges(node: Any, path: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key)
            continue
        meta = f.metadata
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(
                f"bad value for '{key}': {value!r}; allowed: {', '.join(repr(c) for c in choices)}"
            )
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"bad value for '{key}': {value!r}; allowed: a finite number")
        for op, bound, ok in (
            ("ge", meta.get("ge"), lambda v, b: v >= b),
            ("gt", meta.get("gt"), lambda v, b: v > b),
            ("le", meta.get("le"), lambda v, b: v <= b),
            ("lt", meta.get("lt"), lambda v, b: v < b),
        ):
            if bound is not None and not ok(value, bound):
                sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
                raise ConfigError(
                    f"bad value for '{key}': {value!r}; allowed: a number {sym} {bound}"
                    + _range_text(meta)
                )


def _range_text(meta: Any) -> str:
    parts = []
    for op, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(op) is not None:
            parts.append(f"{sym} {meta[op]}")
    return f" (full range: {' and '.join(parts)})" if len(parts) > 1 else ""


def _check_relations(cfg: Config) -> None:  # noqa: C901, PLR0912  (one independent check per cross-field rule)
    """Rules that involve more than one key."""
    r, e, t = cfg.rollout, cfg.eval, cfg.task.arith
    for name, sec in (("rollout", r), ("eval", e)):
        if sec.gen_length % sec.block_length:
            raise ConfigError(
                f"bad value for '{name}.block_length': {sec.block_length}; allowed: a divisor "
                f"of {name}.gen_length ({sec.gen_length})"
            )
        blocks = sec.gen_length // sec.block_length
        if sec.steps % blocks:
            raise ConfigError(
                f"bad value for '{name}.steps': {sec.steps}; allowed: a multiple of the number "
                f"of blocks gen_length/block_length = {blocks}"
            )
    if t.max_operands < t.min_operands:
        raise ConfigError(
            f"bad value for 'task.arith.max_operands': {t.max_operands}; allowed: >= "
            f"task.arith.min_operands ({t.min_operands})"
        )
    bad_ops = [op for op in t.ops if op not in ("+", "-", "*")]
    if bad_ops or not t.ops:
        raise ConfigError(
            f"bad value for 'task.arith.ops': {list(t.ops)!r}; allowed: a non-empty list of '+', '-', '*'"
        )
    from embr_rl.core.losses import LOSS_TRAITS, traits_of  # losses import this module

    traits = traits_of(cfg.algo.name)
    check_batch_shape(cfg.learner, cfg.learner.num_ranks, traits.pairwise, cfg.algo.name)
    _check_score_reference(cfg, traits.energies)
    _check_broadcast(cfg)
    if len(cfg.learner.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.learner.adam_betas):
        raise ConfigError(
            f"bad value for 'learner.adam_betas': {list(cfg.learner.adam_betas)!r}; allowed: two numbers in [0, 1)"
        )
    if cfg.algo.mode == "offline" and traits.needs_fresh_rollouts:
        offline = ", ".join(repr(n) for n, t in LOSS_TRAITS.items() if not t.needs_fresh_rollouts)
        raise ConfigError(
            f"bad value for 'algo.name': {cfg.algo.name!r} with algo.mode='offline'; allowed: "
            f"{offline} ({cfg.algo.name} needs fresh rollouts)"
        )
    r = cfg.rollout
    if r.engine == "vllm" and cfg.model.lora.enabled:
        raise ConfigError(
            "bad value for 'rollout.engine': 'vllm' with model.lora.enabled=true; allowed: "
            "'torch' (the learner then broadcasts the adapter only, which vLLM cannot load)"
        )
    fresh = r.num_workers * r.prompts_per_batch * r.group_size
    if cfg.algo.mode == "sync" and fresh < cfg.learner.batch_size:
        raise ConfigError(
            f"bad value for 'learner.batch_size': {cfg.learner.batch_size} with "
            f"algo.mode='sync'; allowed: <= rollout.num_workers x prompts_per_batch x "
            f"group_size = {fresh} (the rows one round generates)"
        )
    need = max(cfg.buffer.min_size or 0, cfg.learner.batch_size)
    if cfg.buffer.capacity < need:
        raise ConfigError(
            f"bad value for 'buffer.capacity': {cfg.buffer.capacity}; allowed: >= {need} "
            "(learner.batch_size and buffer.min_size rows must fit in the buffer)"
        )
    if cfg.algo.mode == "offline" and not cfg.buffer.offline_path:
        raise ConfigError(
            "bad value for 'buffer.offline_path': None with algo.mode='offline'; allowed: a "
            ".jsonl/.json/.parquet file of scored samples or pairs (see docs/buffer.md)"
        )
    if cfg.algo.mode != "offline" and cfg.rollout.num_workers < 1:
        raise ConfigError(
            f"bad value for 'rollout.num_workers': 0 with algo.mode={cfg.algo.mode!r}; "
            "allowed: >= 1 (only algo.mode='offline' runs without rollout workers)"
        )
    if cfg.algo.name == "d1" and cfg.algo.inner_iterations > 1 and not cfg.rollout.record_logprobs:
        raise ConfigError(
            f"bad value for 'algo.inner_iterations': {cfg.algo.inner_iterations} with "
            "algo.name='d1' and rollout.record_logprobs=false; allowed: 1, or set "
            "rollout.record_logprobs=true (d1's ratio against the sampling policy needs the "
            "behaviour log-probs recorded at rollout time after the first update)"
        )
    if cfg.algo.name in ("spg", "bgpo") and cfg.algo.kl_estimator == "k3":
        raise ConfigError(
            f"bad value for 'algo.kl_estimator': 'k3' with algo.name={cfg.algo.name!r}; "
            "allowed: null or 'k2' (the SPG/BGPO anchor is the per-token k2 on their masked "
            "tokens; k3's gradient is the forward KL's and spiked on UniGRPO's masked tokens, "
            "docs/results.md)"
        )
    if traits.draw_ratio and cfg.algo.inner_iterations > 1 and not cfg.rollout.record_logprobs:
        raise ConfigError(
            f"bad value for 'algo.inner_iterations': {cfg.algo.inner_iterations} with "
            f"algo.name={cfg.algo.name!r} and rollout.record_logprobs=false; allowed: 1, or set "
            "rollout.record_logprobs=true (its ratio against the sampling policy needs the "
            "behaviour log-probs on the rows' seeded masks, recorded at rollout time)"
        )
    if cfg.eval.continuous_batching and cfg.eval.cache == "prefix":
        raise ConfigError(
            "bad value for 'eval.continuous_batching': true with eval.cache='prefix'; allowed: "
            "false, or eval.cache null or 'dual' (the cached prefix would differ in length "
            "from slot to slot)"
        )
    if cfg.rollout.continuous_batching and (
        cfg.rollout.engine != "torch" or cfg.rollout.cache == "prefix"
    ):
        raise ConfigError(
            "bad value for 'rollout.continuous_batching': true with rollout.engine="
            f"{cfg.rollout.engine!r} and rollout.cache={cfg.rollout.cache!r}; allowed: false, or "
            "rollout.engine='torch' with rollout.cache null or 'dual' (the cached prefix would "
            "differ in length from slot to slot; other engines schedule their own batches)"
        )
    if cfg.rollout.record_logprobs:
        if cfg.rollout.engine != "torch":
            raise ConfigError(
                f"bad value for 'rollout.record_logprobs': true with rollout.engine="
                f"{cfg.rollout.engine!r}; allowed: false, or rollout.engine='torch' (the "
                "behaviour log-probs are d1's estimator run on the worker's torch model)"
            )
        if cfg.algo.prompt_mask_prob > 0:
            raise ConfigError(
                f"bad value for 'algo.prompt_mask_prob': {cfg.algo.prompt_mask_prob} with "
                "rollout.record_logprobs=true; allowed: 0 (the recorded log-probs are scored "
                "on the clean prompt, so d1's ratio must be too)"
            )
    if cfg.checkpoint.resume not in ("auto", "never") and not cfg.checkpoint.resume:
        raise ConfigError(
            "bad value for 'checkpoint.resume': ''; allowed: 'auto', 'never' or a path"
        )


def _check_broadcast(cfg: Config) -> None:
    """``cuda_ipc`` hands out a CUDA buffer: every end of it must hold a GPU."""
    if cfg.learner.broadcast != "cuda_ipc":
        return
    ends = [("learner.num_gpus_per_rank", cfg.learner.num_gpus_per_rank)]
    ends.append(("rollout.num_gpus_per_worker", cfg.rollout.num_gpus_per_worker))
    ends.append(("eval.num_gpus", cfg.eval.num_gpus))  # the evaluator receives every version
    for key, gpus in ends:
        if gpus <= 0:
            raise ConfigError(
                f"bad value for 'learner.broadcast': 'cuda_ipc' with {key}={gpus:g}; allowed: "
                "'cuda_ipc' only when the learner, the rollout workers and the evaluator hold "
                "GPUs; on CPU 'shared_memory' (one node), 'object_store' or 'torch_dist'"
            )


def _check_score_reference(cfg: Config, energies: bool) -> None:
    """``rollout.score_reference`` needs a loss that scores reference energies on its own
    mask draws, those draws shared with the policy, and the worker's torch model."""
    if not cfg.rollout.score_reference:
        return
    from embr_rl.core.losses import LOSS_TRAITS  # losses import this module

    allowed = ", ".join(repr(n) for n, t in LOSS_TRAITS.items() if t.energies)
    problem = None
    if not energies:
        problem = f"algo.name={cfg.algo.name!r}; allowed with: {allowed}"
    elif not cfg.algo.common_random_numbers:
        problem = "algo.common_random_numbers=false; allowed with: true (the cached energies are the reference's on the policy's own masks)"
    elif cfg.rollout.engine != "torch":
        problem = f"rollout.engine={cfg.rollout.engine!r}; allowed with: 'torch' (the worker scores the reference in torch)"
    if problem is not None:
        raise ConfigError(f"bad value for 'rollout.score_reference': true with {problem}")


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """Parse ``key=value`` strings (values in YAML syntax) into a config tree."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"bad override {bad[0]!r}; allowed form: key=value, e.g. learner.lr=1e-5")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad override: {exc}") from exc


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Load the schema defaults, merge ``path`` (YAML) and ``overrides``, validate, return.

    Raises :class:`ConfigError` with one message naming the key, value and what is allowed.
    """
    schema = OmegaConf.structured(Config)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            layers.append((str(p), OmegaConf.load(p)))
        except Exception as exc:  # YAML syntax errors
            raise ConfigError(f"{p}: cannot parse YAML: {exc}") from exc
    if overrides:
        layers.append(("override", parse_overrides(overrides)))
    merged = schema
    for source, layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _translate(exc, source) from None
    try:
        OmegaConf.resolve(merged)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _translate(exc, "config") from None
    if cfg.algo.block_length is None:
        cfg.algo.block_length = cfg.rollout.block_length
    validate(cfg)
    return cfg


def check_batch_shape(learner: LearnerConfig, ranks: int, pairwise: bool, algo_name: str) -> None:
    """``learner.batch_size`` splits into micro-batches over ``ranks`` ranks, and a
    pairwise loss's micro-batch holds whole pairs. Run by :func:`validate` at load, and by
    a learner built without a :class:`Config`."""
    per_step = learner.micro_batch_size * ranks
    if learner.batch_size % per_step:
        raise ConfigError(
            f"bad value for 'learner.batch_size': {learner.batch_size}; allowed: a multiple of "
            f"learner.micro_batch_size x learner.num_ranks = {learner.micro_batch_size} x {ranks}"
        )
    if pairwise and learner.micro_batch_size % 2:
        raise ConfigError(
            f"bad value for 'learner.micro_batch_size': {learner.micro_batch_size}; "
            f"allowed: an even number (algo.name={algo_name!r} trains on pairs)"
        )


def validate(cfg: Config) -> None:
    """Check every field's range/choices and the cross-field rules; raise :class:`ConfigError`."""
    _check_ranges(cfg, "")
    _check_relations(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written next to every run's outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, directory: str | os.PathLike[str]) -> Path:
    """Write ``config.yaml`` (resolved) into ``directory`` and return its path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, target)
    return target
