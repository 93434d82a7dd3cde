"""GPU sizing from a run's config: ``python -m embr_rl.plan cfg.yaml [key=value ...]``.

Prints a Markdown table of the memory one learner rank needs at ZeRO stages 0-3 (with
``learner.num_ranks`` ranks) and of what one rollout worker can decode at once on a GPU of
``--gpu-mem-gib``. The accounting follows what :mod:`learner.learner` really builds:

- a torch ``AdamW`` handed to DeepSpeed; with bf16 (``learner.precision`` bf16, or ``auto``
  on a GPU) DeepSpeed casts the module to bf16 and keeps an fp32 master copy of the trainable
  parameters, on which the AdamW moments (fp32 ``m`` and ``v``) live;
- ZeRO-1 partitions master copy and moments over the ranks, ZeRO-2 also the gradients,
  ZeRO-3 also the weights (frozen ones included);
- the reference model is a frozen full copy per rank (never partitioned), or nothing extra
  with ``model.lora.enabled`` (the adapter-disabled base is the reference);
- activations of ``learner.micro_batch_size`` rows, each scored under ``algo.num_mc_samples``
  masks (one mask for ``d1``/``wd1``), of ``prompt + rollout.gen_length`` tokens.

All numbers are bytes unless a name says otherwise; the estimate was not checked against a
GPU measurement (see docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from embr_rl.core.config import Config, ConfigError, LoraConfig, load_config
from embr_rl.core.losses import traits_of

GIB = 1024**3

# DeepSpeed's defaults for the buffers the learner's config leaves unset.
REDUCE_BUCKET_ELEMENTS = 500_000_000  # zero_optimization.reduce_bucket_size
MAX_LIVE_PARAMETERS = 1_000_000_000  # zero_optimization.stage3_max_live_parameters

# Stored activations of one pre-norm SwiGLU block per token, in elements of the activation
# dtype: ACT_H * hidden + ACT_I * intermediate (see :func:`activation_bytes`).
ACT_H = 21
ACT_I = 4
# Live tensors of one block per token during a no-grad forward (rollout decoding).
INFER_H = 8
INFER_I = 3

# Prompt tokens assumed for benchmark tasks when --prompt-length is not given: d1 truncates
# prompts at 200 tokens; 256 leaves room for the chat template.
DEFAULT_PROMPT_LENGTH = 256


class PlanError(ValueError):
    """The planner cannot size this model (unknown architecture, unreadable config.json)."""


@dataclass(frozen=True)
class Arch:
    """The shape of a bidirectional pre-norm SwiGLU transformer, in the model's own names."""

    family: str  # "embr_mdm" (built-in), "llada", "dream" or "llama" (llama-style names)
    vocab_size: int  # rows of the embedding (LLaDA: embedding_size)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Dream (Qwen2-shaped): biases on the q, k and v projections

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections (grouped-query attention shrinks it)."""
        return self.hidden_size // self.num_heads * self.num_kv_heads


# Published config.json of GSAI-ML/LLaDA-8B-Instruct (LLaDA-8B-Base has the same shape):
# d_model 4096, n_layers 32, n_heads 32, n_kv_heads 32, mlp_hidden_size 12288,
# vocab_size = embedding_size = 126464, weight_tying false, include_bias false.
LLADA_8B = Arch(
    family="llada",
    vocab_size=126464,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    intermediate_size=12288,
    tie_word_embeddings=False,
)
# Published config.json of Dream-org/Dream-v0-Instruct-7B (and -Base-7B): hidden_size 3584,
# 28 layers, 28 heads, 4 key/value heads, intermediate_size 18944, vocab_size 152064,
# tie_word_embeddings false, Qwen2's biases on q/k/v.
DREAM_7B = Arch(
    family="dream",
    vocab_size=152064,
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
    tie_word_embeddings=False,
    qkv_bias=True,
)
KNOWN_ARCHS: dict[str, Arch] = {
    "gsai-ml/llada-8b-instruct": LLADA_8B,
    "gsai-ml/llada-8b-base": LLADA_8B,
    "dream-org/dream-v0-instruct-7b": DREAM_7B,
    "dream-org/dream-v0-base-7b": DREAM_7B,
}


# --------------------------------------------------------------------------- parameters


def block_linears(arch: Arch) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of the linear layers in one block."""
    h, i, kv = arch.hidden_size, arch.intermediate_size, arch.kv_dim
    if arch.family == "llada":
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "attn_out": (h, h),
            "ff_proj": (h, i),
            "up_proj": (h, i),
            "ff_out": (i, h),
        }
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def head_name(arch: Arch) -> str:
    """Name of the output projection (LLaDA calls it ``ff_out``, like its blocks' down projection)."""
    return "ff_out" if arch.family == "llada" else "lm_head"


def param_count(arch: Arch) -> int:
    """Parameters: embedding + per block (linears + two RMSNorm gains) + final norm + head.

    ``V*h + L*(sum of in*out + 2h [+ h + 2*kv biases]) + h + (0 if tied else h*V)``; only
    Dream's q/k/v have biases.
    """
    h = arch.hidden_size
    per_block = sum(a * b for a, b in block_linears(arch).values()) + 2 * h
    if arch.qkv_bias:
        per_block += h + 2 * arch.kv_dim
    head = 0 if arch.tie_word_embeddings else h * arch.vocab_size
    return arch.vocab_size * h + arch.num_layers * per_block + h + head


def lora_param_count(arch: Arch, lora: LoraConfig) -> int:
    """Trainable LoRA parameters: ``r * (in + out)`` for every targeted linear layer.

    peft matches ``target_modules`` by the last part of a module's name, so LLaDA's
    ``ff_out`` also matches its output head. A name that matches nothing is a
    :class:`PlanError`, as it is an error when the learner wraps the model.
    """
    if not lora.enabled:
        return 0
    targets = set(lora.target_modules)
    have = {*block_linears(arch), head_name(arch)}
    missing = sorted(targets - have)
    if missing:
        raise PlanError(
            f"model.lora.target_modules names {missing}, which a {arch.family} model does not "
            f"have; its linear layers are: {', '.join(sorted(have))}"
        )
    per_block = sum(lora.r * (a + b) for n, (a, b) in block_linears(arch).items() if n in targets)
    total = arch.num_layers * per_block
    if head_name(arch) in targets and not arch.tie_word_embeddings:
        total += lora.r * (arch.hidden_size + arch.vocab_size)
    return total


def energy_head_count(hidden_size: int, head_hidden: int) -> int:
    """Parameters of the EMBR-E energy head: ``Linear(h, H) -> SiLU -> Linear(H, 1)``."""
    return hidden_size * head_hidden + head_hidden + head_hidden + 1


def _builtin_vocab_size() -> int:
    """Vocabulary of the demo's character tokenizer (what ``embr_rl.pretrain`` trains)."""
    from embr_rl.core.models.tokenizer import train_char_tokenizer
    from embr_rl.pretrain import ARITH_ALPHABET

    return len(train_char_tokenizer([ARITH_ALPHABET]))


def arch_from_hf_config(data: dict[str, object]) -> Arch:
    """An :class:`Arch` from a model folder's ``config.json`` (built-in, LLaDA or llama-style)."""

    def get(*keys: str, default: object = None) -> int:
        for key in keys:
            if data.get(key) is not None:
                return int(data[key])  # type: ignore[call-overload]
        if default is None:
            raise PlanError(f"config.json has none of {keys}")
        return int(default)  # type: ignore[call-overload]

    kind = str(data.get("model_type", ""))
    if kind == "llada" or "d_model" in data:
        heads = get("n_heads")
        return Arch(
            family="llada",
            vocab_size=get("embedding_size", "vocab_size"),
            hidden_size=get("d_model"),
            num_layers=get("n_layers"),
            num_heads=heads,
            num_kv_heads=get("n_kv_heads", default=heads),
            intermediate_size=get("mlp_hidden_size"),
            tie_word_embeddings=bool(data.get("weight_tying", False)),
        )
    heads = get("num_attention_heads")
    family = {"embr_mdm": "embr_mdm", "Dream": "dream"}.get(kind, "llama")
    return Arch(
        family=family,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", default=heads),
        intermediate_size=get("intermediate_size"),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        qkv_bias=family == "dream",
    )


def arch_from_config(cfg: Config) -> Arch:
    """The architecture ``cfg.model`` names: built-in, a local folder, or a known hub id."""
    path = cfg.model.path
    if path == "builtin":
        b = cfg.model.builtin
        return Arch(
            family="embr_mdm",
            vocab_size=_builtin_vocab_size(),
            hidden_size=b.hidden_size,
            num_layers=b.num_layers,
            num_heads=b.num_heads,
            num_kv_heads=b.num_heads,
            intermediate_size=b.intermediate_size,
            tie_word_embeddings=False,
        )
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        try:
            return arch_from_hf_config(json.loads(config_file.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read {config_file}: {exc}") from exc
    known = KNOWN_ARCHS.get(path.lower())
    if known is None:
        raise PlanError(
            f"unknown model {path!r}: the planner knows {sorted(KNOWN_ARCHS)}; point "
            "model.path at a local folder with a config.json to size another model"
        )
    return known


# --------------------------------------------------------------------------- learner


@dataclass(frozen=True)
class LearnerShape:
    """What one learner rank holds, as counts (the accounting turns them into bytes)."""

    total_params: int  # every parameter of the policy network (LoRA adapters included)
    trainable_params: int  # what the optimizer steps on
    bf16: bool
    ranks: int
    lora: bool
    rows: int  # sequences per forward/backward of one micro-batch (micro_batch x mask draws)
    chunk: int  # rows per model call (algo.micro_batch)
    prompt_length: int
    gen_length: int
    checkpointing: bool


def learner_shape(cfg: Config, arch: Arch, prompt_length: int) -> LearnerShape:
    """Counts for one learner rank of ``cfg`` (a GPU run: precision ``auto`` means bf16)."""
    base = param_count(arch)
    lora = lora_param_count(arch, cfg.model.lora)
    traits = traits_of(cfg.algo.name)
    head = (
        energy_head_count(arch.hidden_size, cfg.algo.value_head_hidden) if traits.energy_head else 0
    )
    trainable = (lora if cfg.model.lora.enabled else base) + head
    total = base + lora + head
    precision = cfg.learner.precision
    bf16 = precision == "bf16" or (precision == "auto" and cfg.model.device != "cpu")
    draws = 1 if traits.one_step else cfg.algo.num_mc_samples
    rows = cfg.learner.micro_batch_size * draws
    return LearnerShape(
        total_params=total,
        trainable_params=trainable,
        bf16=bf16,
        ranks=cfg.learner.num_ranks,
        lora=cfg.model.lora.enabled,
        rows=rows,
        chunk=min(cfg.algo.micro_batch, rows),
        prompt_length=prompt_length,
        gen_length=cfg.rollout.gen_length,
        checkpointing=cfg.model.gradient_checkpointing,
    )


def activation_bytes(arch: Arch, shape: LearnerShape, checkpointing: bool) -> int:
    """Activation memory of one micro-batch's forward + backward on one rank.

    With ``T = prompt + gen`` tokens, ``R`` rows (micro_batch_size x mask draws), ``c`` rows
    per model call, ``a`` bytes per activation element (2 in bf16, else 4), L layers:

    - per block and token ``(21h + 4i)`` elements stay stored for backward: the two RMSNorm
      inputs and their fp32 upcasts (2 x (h + 2h)), the norm outputs (2h), q/k before and
      after RoPE and v (5h), the rotated halves (2h), the attention output and its
      re-layout (2h), gate/up/SiLU/product (4i); fused attention stores no ``T x T`` scores;
    - without checkpointing: ``R * T * L * (21h + 4i) * a``;
    - with checkpointing: each block's input ``R * T * L * h * a`` plus one block being
      recomputed ``c * T * (21h + 4i) * a``;
    - log-probabilities: ``log_softmax`` of the completion logits is kept in fp32 for
      backward, ``R * gen * V * 4``; one call's logits are transient on top,
      ``c * (T * V * a + 2 * gen * V * 4)`` (the model's logits, their fp32 copy and its
      gradient).
    """
    a = 2 if shape.bf16 else 4
    h, i, v, layers = arch.hidden_size, arch.intermediate_size, arch.vocab_size, arch.num_layers
    t = shape.prompt_length + shape.gen_length
    block = (ACT_H * h + ACT_I * i) * a
    if checkpointing:
        stored = shape.rows * t * layers * h * a + shape.chunk * t * block
    else:
        stored = shape.rows * t * layers * block
    logp = shape.rows * shape.gen_length * v * 4
    transient = shape.chunk * (t * v * a + 2 * shape.gen_length * v * 4)
    return stored + logp + transient


def learner_memory(
    arch: Arch, shape: LearnerShape, stage: int, reserve_bytes: int = 0
) -> dict[str, int]:
    """Bytes per learner rank at ZeRO ``stage`` (0-3), one entry per table row.

    ``P`` all parameters, ``Q`` trainable ones, ``N`` ranks, ``w`` = 2 (bf16) or 4:

    ============  ==========  =========  =========  =========
    entry          stage 0     stage 1    stage 2    stage 3
    ============  ==========  =========  =========  =========
    weights        wP          wP         wP         wP/N
    gradients      wQ          wQ         wQ/N       wQ/N
    fp32 master    4Q (bf16)   4Q/N       4Q/N       4Q/N
    Adam m, v      8Q          8Q/N       8Q/N       8Q/N
    fp32 grads     4Q (bf16)   4Q/N       4Q/N       4Q/N
    reference      wP without LoRA, 0 with LoRA (every stage)
    buffers        0           wB         wB         wB + wM
    ============  ==========  =========  =========  =========

    ``fp32 grads`` is the fp32 gradient DeepSpeed builds for the optimizer step; ``B`` is
    ``min(Q, reduce_bucket_size)`` and ``M`` is ``min(P, stage3_max_live_parameters)``.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    n, p, q = shape.ranks, shape.total_params, shape.trainable_params
    w = 2 if shape.bf16 else 4
    frac = 1.0 if stage == 0 else 1.0 / n
    out = {
        "weights": w * p if stage < 3 else math.ceil(w * p / n),
        "gradients": w * q if stage < 2 else math.ceil(w * q / n),
        "fp32 master weights": math.ceil(4 * q * frac) if (shape.bf16 or stage > 0) else 0,
        "Adam m and v (fp32)": math.ceil(8 * q * frac),
        "fp32 gradients at the step": math.ceil(4 * q * frac) if (shape.bf16 or stage > 0) else 0,
        "reference model": 0 if shape.lora else w * p,
        "ZeRO buffers": 0
        if stage == 0
        else w * min(q, REDUCE_BUCKET_ELEMENTS)
        + (w * min(p, MAX_LIVE_PARAMETERS) if stage == 3 else 0),
        "activations, checkpointing on": activation_bytes(arch, shape, True),
        "activations, checkpointing off": activation_bytes(arch, shape, False),
    }
    act = out[
        "activations, checkpointing on" if shape.checkpointing else "activations, checkpointing off"
    ]
    states = sum(
        v
        for k, v in out.items()
        if k not in ("activations, checkpointing on", "activations, checkpointing off")
    )
    out["CUDA context and allocator reserve"] = reserve_bytes
    out["total"] = states + act + reserve_bytes
    return out


# --------------------------------------------------------------------------- rollout


def rollout_row_bytes(arch: Arch, cfg: Config, prompt_length: int, weight_bytes: int) -> int:
    """Memory one decoded row needs during a decoding step (no gradients).

    ``T * (8h + 3i) * a`` for the widest block's live tensors, the model's logits over the
    whole sequence ``T * V * a``, the block's Gumbel-max sampling in float64 plus an fp32
    confidence copy ``block_length * V * (3 * 8 + 4)``, and with ``rollout.cache`` the key
    and value cache ``2 * L * T * kv_dim * a``. ``rollout.cfg_scale > 0`` doubles the rows.
    """
    r = cfg.rollout
    a = weight_bytes
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    t = prompt_length + r.gen_length
    row = t * (INFER_H * h + INFER_I * i) * a + t * v * a + r.block_length * v * (3 * 8 + 4)
    if r.cache is not None:
        row += 2 * arch.num_layers * t * arch.kv_dim * a
    return row * (2 if r.cfg_scale > 0 else 1)


def rollout_weight_bytes(cfg: Config) -> int:
    """Bytes per weight on a rollout GPU: bf16 unless ``model.dtype`` says otherwise."""
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.model.dtype, 2)


def max_rollout_rows(weights: int, row: int, gpu_bytes: int, reserve_bytes: int) -> int:
    """Largest number of rows decoded at once that fits next to the weights (0 if none)."""
    free = gpu_bytes - weights - reserve_bytes
    return max(0, free // row) if row > 0 else 0


# --------------------------------------------------------------------------- report


def _fmt(x: float, unit: int) -> str:
    return f"{x / unit:.2f}"


def _count(x: int) -> str:
    if x >= 10**9:
        return f"{x / 1e9:.3f}B"
    if x >= 10**6:
        return f"{x / 1e6:.2f}M"
    return f"{x:,}"


def default_prompt_length(cfg: Config) -> int:
    """Prompt tokens to assume: the arithmetic task's window, else :data:`DEFAULT_PROMPT_LENGTH`."""
    return cfg.pretrain.prompt_length if cfg.task.name == "arith" else DEFAULT_PROMPT_LENGTH


def render(
    cfg: Config, arch: Arch, *, gpu_mem_gib: float, prompt_length: int, reserve_gib: float
) -> str:
    """The Markdown report: model, learner table (ZeRO 0-3), rollout table."""
    gpu = int(gpu_mem_gib * GIB)
    reserve = int(reserve_gib * GIB)
    shape = learner_shape(cfg, arch, prompt_length)
    base = param_count(arch)
    lines = [
        f"# GPU plan for `{cfg.name}` ({cfg.model.path})",
        "",
        f"- model: {_count(base)} parameters ({arch.family}: hidden {arch.hidden_size}, "
        f"{arch.num_layers} layers, {arch.num_heads} heads, intermediate "
        f"{arch.intermediate_size}, vocabulary {arch.vocab_size}, "
        f"{'tied' if arch.tie_word_embeddings else 'untied'} output head)",
        f"- trainable: {_count(shape.trainable_params)}"
        + (
            f" (LoRA r={cfg.model.lora.r} on {', '.join(cfg.model.lora.target_modules)}; "
            "reference = adapter-disabled base)"
            if shape.lora
            else " (full fine-tuning; reference = frozen full copy per rank)"
        ),
        f"- learner: {cfg.learner.num_ranks} ranks x {cfg.learner.num_gpus_per_rank:g} GPU, "
        f"{'bf16' if shape.bf16 else 'fp32'}, configured ZeRO stage {cfg.learner.zero_stage}; "
        f"micro-batch {cfg.learner.micro_batch_size} x {shape.rows // cfg.learner.micro_batch_size}"
        f" mask draws = {shape.rows} rows of {prompt_length} + {shape.gen_length} tokens, "
        f"{shape.chunk} rows per call, gradient checkpointing "
        f"{'on' if shape.checkpointing else 'off'}",
        f"- rollout: {cfg.rollout.num_workers} workers x {cfg.rollout.num_gpus_per_worker:g} GPU; "
        f"GPUs in all: {cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank + cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker:g}",
        f"- GPU memory assumed: {gpu_mem_gib:g} GiB, of which {reserve_gib:g} GiB reserved "
        "(CUDA context, NCCL, allocator fragmentation); estimates, not measurements",
        "",
    ]
    tables = {s: learner_memory(arch, shape, s, reserve) for s in range(4)}
    largest = max(v for k, v in tables[0].items() if k != "total" and "reserve" not in k)
    unit, unit_name = (GIB, "GiB") if largest >= GIB // 2 else (1024**2, "MiB")
    lines += [f"## Learner, per rank ({unit_name})", ""]
    header = [
        f"ZeRO-{s}" + (" (configured)" if s == cfg.learner.zero_stage else "") for s in range(4)
    ]
    lines.append("| | " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * 4)
    for key in tables[0]:
        label = f"**{key}**" if key == "total" else key
        lines.append(
            f"| {label} | " + " | ".join(_fmt(tables[s][key], unit) for s in range(4)) + " |"
        )
    lines.append(
        f"| fits in {gpu_mem_gib:g} GiB | "
        + " | ".join("yes" if tables[s]["total"] <= gpu else "no" for s in range(4))
        + " |"
    )
    w = rollout_weight_bytes(cfg)
    weights = w * base
    row = rollout_row_bytes(arch, cfg, prompt_length, w)
    most = max_rollout_rows(weights, row, gpu, reserve)
    wanted = cfg.rollout.prompts_per_batch * cfg.rollout.group_size
    r_unit, r_name = (GIB, "GiB") if weights >= GIB // 2 else (1024**2, "MiB")
    lines += [
        "",
        "## Rollout worker, per GPU",
        "",
        "| | value |",
        "|---|---:|",
        f"| weights ({r_name}) | {_fmt(weights, r_unit)} |",
        f"| per decoded row (MiB) | {_fmt(row, 1024**2)} |",
        f"| largest batch that fits (rows) | {most} |",
        f"| configured batch: prompts_per_batch x group_size (rows) | {wanted} |",
        f"| fits in {gpu_mem_gib:g} GiB | {'yes' if 0 < wanted <= most else 'no'} |",
        "",
        "Formulas: see the docstrings of `embr_rl.plan` (learner_memory, activation_bytes, "
        "rollout_row_bytes).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m embr_rl.plan cfg.yaml [key=value ...] [--gpu-mem-gib 80]``."""
    parser = argparse.ArgumentParser(
        prog="python -m embr_rl.plan", description="GPU sizing table for an EMBR-RL config."
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument(
        "--prompt-length",
        type=int,
        default=None,
        help=f"prompt tokens (default: arith's window, else {DEFAULT_PROMPT_LENGTH})",
    )
    parser.add_argument(
        "--reserve-gib", type=float, default=3.0, help="held back per GPU for CUDA/NCCL/allocator"
    )
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        arch = arch_from_config(cfg)
    except (ConfigError, PlanError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    prompt = args.prompt_length if args.prompt_length is not None else default_prompt_length(cfg)
    print(
        render(
            cfg,
            arch,
            gpu_mem_gib=args.gpu_mem_gib,
            prompt_length=prompt,
            reserve_gib=args.reserve_gib,
        )
    )
    return 0


__all__ = [
    "KNOWN_ARCHS",
    "LLADA_8B",
    "Arch",
    "LearnerShape",
    "PlanError",
    "activation_bytes",
    "arch_from_config",
    "arch_from_hf_config",
    "block_linears",
    "learner_memory",
    "learner_shape",
    "lora_param_count",
    "main",
    "max_rollout_rows",
    "param_count",
    "render",
    "rollout_row_bytes",
]

if __name__ == "__main__":
    sys.exit(main())
