"""The GPU planner: parameter formula vs real models, per-rank memory vs hand arithmetic, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from embr_rl.core.config import load_config
from embr_rl.plan import (
    LLADA_8B,
    PlanError,
    activation_bytes,
    arch_from_config,
    arch_from_hf_config,
    learner_memory,
    learner_shape,
    lora_param_count,
    main,
    param_count,
)

REPO = Path(__file__).resolve().parents[3]

STATE_KEYS = (
    "weights",
    "gradients",
    "fp32 master weights",
    "Adam m and v (fp32)",
    "fp32 gradients at the step",
    "reference model",
    "ZeRO buffers",
)


def _built_model(overrides: list[str]):  # type: ignore[no-untyped-def]
    from embr_rl.core.models.loader import build_builtin_model
    from embr_rl.core.models.tokenizer import train_char_tokenizer
    from embr_rl.pretrain import ARITH_ALPHABET

    cfg = load_config(REPO / "configs/demo.yaml", ["model.path=builtin", *overrides])
    return cfg, build_builtin_model(cfg.model.builtin, train_char_tokenizer([ARITH_ALPHABET]))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "model.builtin.hidden_size=64",
            "model.builtin.num_layers=3",
            "model.builtin.num_heads=2",
            "model.builtin.intermediate_size=96",
        ],
    ],
)
def test_parameter_formula_matches_a_built_model(overrides: list[str]) -> None:
    cfg, model = _built_model(overrides)
    arch = arch_from_config(cfg)
    assert param_count(arch) == sum(p.numel() for p in model.parameters())
    # the same numbers from the saved config.json of that model
    assert param_count(arch_from_hf_config(model.config.to_dict())) == param_count(arch)


def test_lora_formula_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    cfg, model = _built_model(
        [
            "model.lora.enabled=true",
            "model.lora.r=4",
            "model.lora.target_modules=[q_proj,v_proj,up_proj]",
        ]
    )
    wrapped = peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert lora_param_count(arch_from_config(cfg), cfg.model.lora) == trainable


def test_demo_model_by_hand() -> None:
    """The demo's built-in model, 1 rank, ZeRO-0, bf16 on a GPU, no LoRA."""
    # configs/demo.yaml changes as the demo evolves: pin what the arithmetic below uses
    pinned = [
        "model.builtin.hidden_size=128",
        "model.builtin.num_layers=4",
        "model.builtin.num_heads=4",
        "model.builtin.intermediate_size=384",
        "model.gradient_checkpointing=false",
        "model.lora.enabled=false",
        "learner.num_ranks=1",
        "learner.precision=auto",
        "learner.batch_size=64",
        "learner.micro_batch_size=8",
        "algo.name=embr_c",
        "algo.num_mc_samples=4",
        "algo.micro_batch=16",
        "rollout.gen_length=32",
        "rollout.block_length=8",
        "rollout.steps=16",
    ]
    cfg = load_config(REPO / "configs/demo.yaml", pinned)
    arch = arch_from_config(cfg)
    # vocabulary: 25 distinct characters of "0123456789+-*=();\boxed{}" + 4 specials = 29
    assert arch.vocab_size == 29
    # embedding 29*128 + head 128*29 = 7424; per block 4*128^2 + 3*128*384 + 2*128
    # = 65536 + 147456 + 256 = 213248; 4 blocks = 852992; final norm 128
    p = 7424 + 852992 + 128
    assert p == 860544 == param_count(arch)
    shape = learner_shape(cfg, arch, prompt_length=16)
    mem = learner_memory(arch, shape, stage=0)
    assert mem["weights"] == 2 * p == 1721088
    assert mem["gradients"] == 2 * p
    assert mem["fp32 master weights"] == 4 * p == 3442176
    assert mem["Adam m and v (fp32)"] == 8 * p == 6884352
    assert mem["fp32 gradients at the step"] == 4 * p
    assert mem["reference model"] == 2 * p
    assert mem["ZeRO buffers"] == 0
    # activations: rows = micro_batch 8 x 4 mask draws = 32, T = 16 + 32 = 48, chunk 16,
    # stored per token and block (21*128 + 4*384) * 2 B = 8448 B; no checkpointing:
    # 32*48*4*8448 = 51904512; log-probs 32*32*29*4 = 118784;
    # one call's logits 16*(48*29*2 + 2*32*29*4) = 16*(2784 + 7424) = 163328
    assert shape.rows == 32 and shape.chunk == 16 and not shape.checkpointing
    act = 51904512 + 118784 + 163328
    assert activation_bytes(arch, shape, checkpointing=False) == act
    assert mem["activations, checkpointing off"] == act
    # with checkpointing: block inputs 32*48*4*128*2 = 1572864, one block 16*48*8448 = 6488064
    assert activation_bytes(arch, shape, checkpointing=True) == 1572864 + 6488064 + 118784 + 163328
    assert mem["total"] == 2 * p + 2 * p + 4 * p + 8 * p + 4 * p + 2 * p + act


def test_llada_8b_zero2_four_ranks_by_hand() -> None:
    """LLaDA-8B-Instruct, 4 ranks, ZeRO-2, bf16, full fine-tuning (LoRA off)."""
    cfg = load_config(REPO / "configs/llada8b_gsm8k.yaml", ["model.lora.enabled=false"])
    arch = arch_from_config(cfg)
    assert arch == LLADA_8B
    # embedding 126464*4096 = 517996544, untied head the same; per block
    # 4*4096^2 + 3*4096*12288 + 2*4096 = 67108864 + 150994944 + 8192 = 218112000, x32 =
    # 6979584000; final norm 4096
    p = 2 * 517996544 + 6979584000 + 4096
    assert p == 8015581184 == param_count(arch)
    shape = learner_shape(cfg, arch, prompt_length=256)
    assert shape.bf16 and shape.ranks == 4
    mem = learner_memory(arch, shape, stage=2)
    assert mem["weights"] == 2 * p == 16031162368
    assert mem["gradients"] == 2 * p // 4 == 4007790592
    assert mem["fp32 master weights"] == 4 * p // 4 == 8015581184
    assert mem["Adam m and v (fp32)"] == 8 * p // 4 == 16031162368
    assert mem["fp32 gradients at the step"] == 4 * p // 4
    assert mem["reference model"] == 2 * p  # full bf16 copy on every rank
    assert mem["ZeRO buffers"] == 2 * 500_000_000  # reduce bucket, bf16
    # ZeRO-3 partitions the weights too, never the reference
    z3 = learner_memory(arch, shape, stage=3)
    assert z3["weights"] == 2 * p // 4 and z3["reference model"] == 2 * p
    assert z3["ZeRO buffers"] == 2 * 500_000_000 + 2 * 1_000_000_000
    # ZeRO-0: nothing partitioned
    z0 = learner_memory(arch, shape, stage=0)
    assert z0["gradients"] == 2 * p and z0["Adam m and v (fp32)"] == 8 * p


def test_llada_8b_lora_by_hand() -> None:
    """configs/llada8b_gsm8k.yaml as shipped: LoRA r=128 on q/k/v, ZeRO-2, 4 ranks."""
    cfg = load_config(REPO / "configs/llada8b_gsm8k.yaml")
    arch = arch_from_config(cfg)
    # 3 modules x 32 blocks x 128 * (4096 + 4096)
    q = 3 * 32 * 128 * (4096 + 4096)
    assert q == 100663296 == lora_param_count(arch, cfg.model.lora)
    shape = learner_shape(cfg, arch, prompt_length=256)
    assert shape.trainable_params == q and shape.total_params == 8015581184 + q
    mem = learner_memory(arch, shape, stage=2)
    assert mem["weights"] == 2 * (8015581184 + q)
    assert mem["gradients"] == 2 * q // 4
    assert mem["fp32 master weights"] == 4 * q // 4
    assert mem["Adam m and v (fp32)"] == 8 * q // 4
    assert mem["reference model"] == 0  # adapter-disabled base
    assert mem["ZeRO buffers"] == 2 * q  # the bucket is capped by the trainable count


def test_lora_target_names_that_do_not_exist_are_refused() -> None:
    cfg = load_config(
        REPO / "configs/llada8b_gsm8k.yaml", ["model.lora.target_modules=[q_proj,o_proj]"]
    )
    # LLaDA's output projection is attn_out: o_proj matches nothing, as the learner refuses.
    with pytest.raises(PlanError, match=r"\['o_proj'\].*attn_out"):
        lora_param_count(LLADA_8B, cfg.model.lora)
    cfg.model.lora.target_modules = ["q_proj", "attn_out"]
    assert lora_param_count(LLADA_8B, cfg.model.lora) == 32 * 128 * (4096 + 4096) * 2


@pytest.mark.parametrize(
    ("family", "arch_name", "count"),
    [("llada", "LLADA_8B", 8_015_581_184), ("Dream", "DREAM_7B", None)],
)
def test_param_count_equals_the_native_model_built_from_the_hub_config(
    family: str, arch_name: str, count: int | None
) -> None:
    """The planner's count is the native implementation's, built on the meta device from
    the published config.json shape (LLaDA-8B-Instruct: 8,015,581,184)."""
    import torch

    from embr_rl import plan
    from embr_rl.core.models.native import NATIVE_MODELS

    arch = getattr(plan, arch_name)
    if family == "llada":
        hub = dict(
            d_model=arch.hidden_size,
            n_layers=arch.num_layers,
            n_heads=arch.num_heads,
            n_kv_heads=arch.num_kv_heads,
            mlp_hidden_size=arch.intermediate_size,
            vocab_size=arch.vocab_size,
            embedding_size=arch.vocab_size,
            weight_tying=False,
            block_type="llama",
            activation_type="silu",
            rope=True,
            layer_norm_type="rms",
        )
    else:
        hub = dict(
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_kv_heads,
            intermediate_size=arch.intermediate_size,
            vocab_size=arch.vocab_size,
        )
    native = NATIVE_MODELS[family]
    with torch.device("meta"):
        model = native.model_class(native.config_class(**hub))
    built = sum(p.numel() for p in model.parameters())
    assert plan.param_count(arch) == built
    assert plan.param_count(plan.arch_from_hf_config({"model_type": family, **hub})) == built
    if count is not None:
        assert built == count


def test_cli_prints_a_markdown_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(REPO / "configs/llada8b_gsm8k.yaml"), "--gpu-mem-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "| | ZeRO-0 | ZeRO-1 | ZeRO-2 (configured) | ZeRO-3 |" in out
    assert "|---|---:|---:|---:|---:|" in out
    assert "8.016B parameters" in out and "largest batch that fits" in out


def test_cli_rejects_a_bad_key_with_exit_code_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "embr_rl.plan", "configs/demo.yaml", "learner.num_rankz=2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'learner.num_rankz'" in proc.stderr


def test_cli_rejects_an_unknown_hub_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(REPO / "configs/demo.yaml"), "model.path=someone/unknown-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
