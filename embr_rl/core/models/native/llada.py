"""LLaDA (GSAI-ML/LLaDA-8B-Instruct and kin), written for this project.

Reads the hub checkpoint as it is: config.json's keys (``d_model``, ``n_heads``,
``n_layers``, ``mlp_hidden_size``, ``rope_theta``, ...) and the safetensors' names
(``model.transformer.wte``, ``model.transformer.blocks.N.{attn_norm, q_proj, k_proj,
v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}``, ``model.transformer.ln_f``,
``model.transformer.ff_out``). The mathematics is that of the hub's ``LLaDALlamaBlock``:

    h   = x + attn_out(SDPA(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1))),  n1 = attn_norm(x)
    out = h + ff_out(act(ff_proj(n2)) * up_proj(n2)),                          n2 = ff_norm(h)

with bidirectional attention (no causal mask), padding keys masked, RoPE in float32 on
index positions (``rope_full_precision``), and logits ``ff_out(ln_f(x))`` (or the tied
embedding, optionally scaled by ``1/sqrt(d_model)``). Logits are position-aligned already:
``logits[:, i]`` scores token ``i``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from embr_rl.core.models.modeling import EmbrDiffusionOutput, KVCache
from embr_rl.core.models.native._layers import (
    HubRMSNorm,
    attention_mask_for,
    grouped_attention,
    init_hub_weights,
    positions_and_keys,
    rope_tables,
    rotate,
    run_layers,
)

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}

# config.json keys and their defaults when a checkpoint omits them (those of the hub's
# configuration_llada.ModelConfig).
_DEFAULTS: dict[str, Any] = {
    "d_model": 768,
    "n_heads": 12,
    "n_kv_heads": None,
    "n_layers": 12,
    "mlp_ratio": 4,
    "mlp_hidden_size": None,
    "activation_type": "swiglu",
    "block_type": "sequential",
    "block_group_size": 1,
    "alibi": False,
    "rope": False,
    "rope_full_precision": True,
    "rope_theta": 10000.0,
    "attention_dropout": 0.1,
    "residual_dropout": 0.1,
    "embedding_dropout": 0.1,
    "multi_query_attention": None,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "layer_norm_type": "default",
    "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-5,
    "max_sequence_length": 1024,
    "include_qkv_bias": False,
    "include_bias": False,
    "bias_for_layer_norm": None,
    "scale_logits": False,
    "vocab_size": 50257,
    "embedding_size": 50304,
    "weight_tying": True,
    "mask_token_id": 50256,
    "pad_token_id": 50256,
    "eos_token_id": 50256,
    "init_std": 0.02,
}


class LLaDANativeConfig(PretrainedConfig):
    """LLaDA's config.json, read with the hub's key names and defaults.

    ``hidden_size``, ``num_attention_heads`` and ``num_hidden_layers`` alias ``d_model``,
    ``n_heads`` and ``n_layers`` for code written against transformers' names.
    """

    model_type = "llada"
    attribute_map = {  # noqa: RUF012  (transformers convention)
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
    }

    def __init__(self, **kwargs: Any) -> None:
        for key, default in _DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        kwargs.pop("use_cache", None)
        self.use_cache = False
        # Tying is done by the model itself (``weight_tying``), never by transformers.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or 1 with ``multi_query_attention``, else ``n_heads``."""
        if self.n_kv_heads is not None:
            return int(self.n_kv_heads)
        return 1 if self.multi_query_attention else int(self.n_heads)

    @property
    def ff_hidden(self) -> int:
        """The feed-forward width: ``mlp_hidden_size``, else ``mlp_ratio * d_model``."""
        if self.mlp_hidden_size is not None:
            return int(self.mlp_hidden_size)
        return int(self.mlp_ratio) * int(self.d_model)

    @property
    def num_embeddings(self) -> int:
        """Rows of the embedding and columns of the logits (``embedding_size`` or ``vocab_size``)."""
        return int(self.embedding_size or self.vocab_size)

    def check_supported(self) -> None:
        """Fail clearly on the config.json options this implementation does not cover."""
        problems = []
        if self.block_type != "llama":
            problems.append(f"block_type={self.block_type!r} (only 'llama')")
        if self.activation_type not in _ACTIVATIONS:
            problems.append(
                f"activation_type={self.activation_type!r} (allowed: {', '.join(_ACTIVATIONS)})"
            )
        if not self.rope or self.alibi:
            problems.append("positions other than RoPE (rope must be true, alibi false)")
        if self.layer_norm_type != "rms" or not self.layer_norm_with_affine:
            problems.append(f"layer_norm_type={self.layer_norm_type!r} (only affine 'rms')")
        if self.attention_layer_norm:
            problems.append("attention_layer_norm=true")
        if self.block_group_size != 1:
            problems.append(f"block_group_size={self.block_group_size}")
        if self.include_bias or self.bias_for_layer_norm:
            problems.append("include_bias / bias_for_layer_norm")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            problems.append("d_model must split into n_heads heads of even size")
        if self.n_heads % self.kv_heads:
            problems.append("n_heads must be a multiple of n_kv_heads")
        if problems:
            raise ValueError(
                "the native LLaDA implementation does not support "
                + "; ".join(problems)
                + "; use model.implementation=remote with the checkpoint's own code"
            )


class _LLaDABlock(nn.Module):
    """One ``LLaDALlamaBlock``, with the hub's parameter names."""

    def __init__(self, cfg: LLaDANativeConfig) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
        qkv_bias = bool(cfg.include_qkv_bias)
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
        self.full_precision_rope = bool(cfg.rope_full_precision)
        self.attention_dropout = float(cfg.attention_dropout)
        self.act = _ACTIVATIONS[cfg.activation_type]
        self.attn_norm = HubRMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = HubRMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, cfg.ff_hidden, bias=False)
        self.up_proj = nn.Linear(d, cfg.ff_hidden, bias=False)
        self.ff_out = nn.Linear(cfg.ff_hidden, d, bias=False)
        self.dropout = nn.Dropout(float(cfg.residual_dropout))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = rotate(q, cos, sin, full_precision=self.full_precision_rope)
        k = rotate(k, cos, sin, full_precision=self.full_precision_rope)
        drop = self.attention_dropout if self.training else 0.0
        att = grouped_attention(q, k, v, attn_mask, past, drop)
        x = x + self.dropout(self.attn_out(att.transpose(1, 2).reshape(b, t, -1)))
        n = self.ff_norm(x)
        x = x + self.dropout(self.ff_out(self.act(self.ff_proj(n)) * self.up_proj(n)))
        return x, (k, v)


class LLaDANativeModel(PreTrainedModel):
    """LLaDA's masked-diffusion denoiser with the project's model interface
    (see :mod:`embr_rl.core.models.modeling`: key/value cache, position-aligned logits)."""

    config_class = LLaDANativeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["_LLaDABlock"]  # noqa: RUF012  (transformers convention)
    _supports_sdpa = True

    def __init__(self, config: LLaDANativeConfig) -> None:
        super().__init__(config)
        config.check_supported()
        parts: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.num_embeddings, config.d_model),
            "emb_drop": nn.Dropout(float(config.embedding_dropout)),
            "blocks": nn.ModuleList(_LLaDABlock(config) for _ in range(config.n_layers)),
            "ln_f": HubRMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            parts["ff_out"] = nn.Linear(config.d_model, config.num_embeddings, bias=False)
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(parts)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_hub_weights(module, float(self.config.init_std))

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.transformer

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer["wte"]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer["wte"] = value

    def get_output_embeddings(self) -> nn.Module:
        return self.transformer["wte"] if self.config.weight_tying else self.transformer["ff_out"]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **_: object,
    ) -> EmbrDiffusionOutput:
        """Logits [B, T, V] for every position of ``input_ids`` [B, T] (interface of
        :meth:`embr_rl.core.models.EmbrDiffusionModel.forward`)."""
        position_ids, key_mask = positions_and_keys(
            input_ids, attention_mask, position_ids, kv_cache, count_real=False
        )
        attn_mask, key_mask = attention_mask_for(key_mask, kv_cache)
        tr = self.transformer
        x = tr["wte"](input_ids)
        if self.config.input_emb_norm:
            x = x * (self.config.d_model**0.5)
        x = tr["emb_drop"](x)
        cos, sin = rope_tables(
            position_ids, self.config.d_model // self.config.n_heads, self.config.rope_theta
        )
        x, keys, values, hidden = run_layers(
            tr["blocks"],
            x,
            cos,
            sin,
            attn_mask,
            kv_cache,
            checkpointing=self.gradient_checkpointing and self.training,
            output_hidden_states=output_hidden_states,
        )
        x = tr["ln_f"](x)
        head = tr["wte"].weight if self.config.weight_tying else tr["ff_out"].weight
        logits = F.linear(x, head)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return EmbrDiffusionOutput(
            logits=logits,
            last_hidden_state=x,
            hidden_states=(*hidden, x) if output_hidden_states else None,
            kv_cache=(
                KVCache(keys, values, key_mask, position_ids, input_ids) if use_cache else None
            ),
        )
