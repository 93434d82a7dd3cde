"""Tiny random checkpoints laid out as the hub snapshots of LLaDA-8B-Instruct and
Dream-v0-Instruct-7B: their config.json keys (tiny sizes), their parameter names in sharded
safetensors with an index, their remote-code file names (files that fail if anything
imports them: the native path must run none of it), and a tokenizer with their special
tokens. Also the originals' mathematics, written out plainly from a state dict, as the
reference the native implementations are checked against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ALPHABET = "0123456789+-*/=()., abcdefghijklmnopqrstuvwxyz?:<>\n"
REMOTE_FILES = {
    "llada": ("configuration_llada.py", "modeling_llada.py"),
    "Dream": ("configuration_dream.py", "modeling_dream.py", "generation_utils.py"),
}
_TRAP = "raise RuntimeError('remote code of this snapshot was executed')\n"

LLADA_SPECIALS = {
    "eos": "<|endoftext|>",
    "bos": "<|startoftext|>",
    "mask": "<|mdm_mask|>",
    "eot": "<|eot_id|>",
    "others": ["<|start_header_id|>", "<|end_header_id|>"],
}
DREAM_SPECIALS = {
    "eos": "<|endoftext|>",
    "bos": None,
    "mask": "<|mask|>",
    "eot": "<|im_end|>",
    "others": ["<|im_start|>"],
}
LLADA_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DREAM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: dict, template: str) -> PreTrainedTokenizerFast:
    names = [specials["eos"], specials["mask"], specials["eot"], *specials["others"]]
    if specials["bos"]:
        names.append(specials["bos"])
    vocab = {name: i for i, name in enumerate(names)}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=specials["eos"],
        pad_token=specials["eos"],
        mask_token=specials["mask"],
        unk_token="<unk>",
        bos_token=specials["bos"],
        additional_special_tokens=[specials["eot"], *specials["others"]],
    )
    fast.chat_template = template
    return fast


def _write(root: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(tensors)
    parts = [names[i::shards] for i in range(shards)]
    index: dict[str, str] = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(root / fname), {"format": "pt"})
        index.update({n: fname for n in part})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": index}, indent=2)
    )


def _rand(gen: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def llada_snapshot(
    root: Path,
    *,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    mlp_hidden_size: int = 96,
    seed: int = 0,
    shards: int = 2,
) -> Path:
    """A LLaDA-8B-Instruct-shaped snapshot at tiny sizes in ``root``."""
    tok = _tokenizer(LLADA_SPECIALS, LLADA_TEMPLATE)
    vocab = len(tok)
    kv = n_kv_heads or n_heads
    hd = d_model // n_heads
    config = {
        "_name_or_path": "GSAI-ML/LLaDA-8B-Instruct",
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": d_model,
        "embedding_dropout": 0.0,
        "embedding_size": vocab,
        "eos_token_id": tok.eos_token_id,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": tok.mask_token_id,
        "max_sequence_length": 4096,
        "mlp_hidden_size": mlp_hidden_size,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": n_heads,
        "n_kv_heads": kv,
        "n_layers": n_layers,
        "pad_token_id": tok.eos_token_id,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2",
        "use_cache": False,
        "vocab_size": vocab,
        "weight_tying": False,
    }
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "model.transformer.wte.weight": _rand(gen, vocab, d_model, scale=1.0),
        "model.transformer.ln_f.weight": 1 + _rand(gen, d_model, scale=0.1),
        "model.transformer.ff_out.weight": _rand(gen, vocab, d_model),
    }
    for i in range(n_layers):
        p = f"model.transformer.blocks.{i}."
        t[p + "attn_norm.weight"] = 1 + _rand(gen, d_model, scale=0.1)
        t[p + "ff_norm.weight"] = 1 + _rand(gen, d_model, scale=0.1)
        t[p + "q_proj.weight"] = _rand(gen, d_model, d_model)
        t[p + "k_proj.weight"] = _rand(gen, kv * hd, d_model)
        t[p + "v_proj.weight"] = _rand(gen, kv * hd, d_model)
        t[p + "attn_out.weight"] = _rand(gen, d_model, d_model)
        t[p + "ff_proj.weight"] = _rand(gen, mlp_hidden_size, d_model)
        t[p + "up_proj.weight"] = _rand(gen, mlp_hidden_size, d_model)
        t[p + "ff_out.weight"] = _rand(gen, d_model, mlp_hidden_size)
    _write(root, config, {k: v.to(torch.bfloat16) for k, v in t.items()}, shards)
    _finish(root, tok, "llada")
    return root


def dream_snapshot(
    root: Path,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 96,
    seed: int = 0,
    shards: int = 2,
) -> Path:
    """A Dream-v0-Instruct-7B-shaped snapshot at tiny sizes in ``root``."""
    tok = _tokenizer(DREAM_SPECIALS, DREAM_TEMPLATE)
    vocab = len(tok)
    h, kv, hd = hidden_size, num_key_value_heads, hidden_size // num_attention_heads
    config = {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": tok.eos_token_id,
        "eos_token_id": tok.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": h,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "mask_token_id": tok.mask_token_id,
        "max_position_embeddings": 131072,
        "max_window_layers": num_hidden_layers,
        "model_type": "Dream",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": kv,
        "pad_token_id": tok.eos_token_id,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _rand(gen, vocab, h, scale=1.0),
        "model.norm.weight": 1 + _rand(gen, h, scale=0.1),
        "lm_head.weight": _rand(gen, vocab, h),
    }
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + _rand(gen, h, scale=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + _rand(gen, h, scale=0.1)
        for name, rows in (("q_proj", h), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            t[p + f"self_attn.{name}.weight"] = _rand(gen, rows, h)
            t[p + f"self_attn.{name}.bias"] = _rand(gen, rows, scale=0.1)
        t[p + "self_attn.o_proj.weight"] = _rand(gen, h, h)
        t[p + "mlp.gate_proj.weight"] = _rand(gen, intermediate_size, h)
        t[p + "mlp.up_proj.weight"] = _rand(gen, intermediate_size, h)
        t[p + "mlp.down_proj.weight"] = _rand(gen, h, intermediate_size)
    _write(root, config, {k: v.to(torch.bfloat16) for k, v in t.items()}, shards)
    _finish(root, tok, "Dream")
    return root


def _finish(root: Path, tok: PreTrainedTokenizerFast, family: str) -> None:
    tok.save_pretrained(root)
    for name in REMOTE_FILES[family]:
        (root / name).write_text(_TRAP)


def load_state(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a snapshot, in float32."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


# --------------------------------------------------------------------------- references


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None, :, None] * inv  # [B, 1, T, d/2]
    c, s = torch.cos(ang).float(), torch.sin(ang).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _attend(q, k, v, bias) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return torch.softmax(scores, dim=-1) @ v


def llada_reference(
    state: dict[str, torch.Tensor], config: dict, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """LLaDA's forward as its hub code computes it (fp32): index positions, a float padding
    bias of ``finfo.min`` on padding keys, no causal mask."""
    b, t = ids.shape
    nh, d = config["n_heads"], config["d_model"]
    kv, hd, eps = config["n_kv_heads"], d // nh, config["rms_norm_eps"]
    pos = torch.arange(t).expand(b, t)
    bias = ((1.0 - mask.float()) * torch.finfo(torch.float32).min)[:, None, None, :]
    x = state["model.transformer.wte.weight"][ids]
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        n = _rms(x, state[p + "attn_norm.weight"], eps)
        q = (n @ state[p + "q_proj.weight"].T).view(b, t, nh, hd).transpose(1, 2)
        k = (n @ state[p + "k_proj.weight"].T).view(b, t, kv, hd).transpose(1, 2)
        v = (n @ state[p + "v_proj.weight"].T).view(b, t, kv, hd).transpose(1, 2)
        q, k = _rope(q, pos, config["rope_theta"]), _rope(k, pos, config["rope_theta"])
        att = _attend(q, k, v, bias).transpose(1, 2).reshape(b, t, d)
        x = x + att @ state[p + "attn_out.weight"].T
        n = _rms(x, state[p + "ff_norm.weight"], eps)
        ff = torch.nn.functional.silu(n @ state[p + "ff_proj.weight"].T)
        x = x + (ff * (n @ state[p + "up_proj.weight"].T)) @ state[p + "ff_out.weight"].T
    x = _rms(x, state["model.transformer.ln_f.weight"], eps)
    return x @ state["model.transformer.ff_out.weight"].T


def dream_reference(
    state: dict[str, torch.Tensor], config: dict, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Dream's forward as its sampler calls it (fp32): positions counted over real tokens
    (padding at 1), a boolean mask that is real-query AND real-key, then the sampler's
    shift ``cat([logits[:, :1], logits[:, :-1]])``."""
    b, t = ids.shape
    nh, h = config["num_attention_heads"], config["hidden_size"]
    kv, hd, eps = config["num_key_value_heads"], h // nh, config["rms_norm_eps"]
    real = mask.bool()
    pos = (mask.long().cumsum(-1) - 1).masked_fill(~real, 1)
    allowed = real[:, None, :, None] & real[:, None, None, :]
    bias = torch.zeros(b, 1, t, t).masked_fill(~allowed, float("-inf"))
    # A fully masked (padding) query row would be NaN; its value never reaches a real row.
    bias = bias.masked_fill(~real[:, None, :, None], 0.0)
    x = state["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        n = _rms(x, state[p + "input_layernorm.weight"], eps)

        def proj(name: str, heads: int, n: torch.Tensor = n, p: str = p) -> torch.Tensor:
            w, bb = state[p + f"self_attn.{name}.weight"], state[p + f"self_attn.{name}.bias"]
            return (n @ w.T + bb).view(b, t, heads, hd).transpose(1, 2)

        q, k, v = proj("q_proj", nh), proj("k_proj", kv), proj("v_proj", kv)
        q, k = _rope(q, pos, config["rope_theta"]), _rope(k, pos, config["rope_theta"])
        att = _attend(q, k, v, bias).transpose(1, 2).reshape(b, t, h)
        x = x + att @ state[p + "self_attn.o_proj.weight"].T
        n = _rms(x, state[p + "post_attention_layernorm.weight"], eps)
        g = torch.nn.functional.silu(n @ state[p + "mlp.gate_proj.weight"].T)
        x = x + (g * (n @ state[p + "mlp.up_proj.weight"].T)) @ state[p + "mlp.down_proj.weight"].T
    logits = _rms(x, state["model.norm.weight"], eps) @ state["lm_head.weight"].T
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
