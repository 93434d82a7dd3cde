"""Dream (Dream-org/Dream-v0-Instruct-7B and kin), written for this project.

Dream is a Qwen2-shaped bidirectional transformer. This reads its checkpoint as it is:
config.json (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``, ``rope_theta``, ``tie_word_embeddings``, ...) and the safetensors'
names (``model.embed_tokens``, ``model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head``). Per layer

    h   = x + o_proj(SDPA(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1))),  n1 = input_layernorm(x)
    out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2)),                  n2 = post_attention_layernorm(h)

(q/k/v with biases, grouped-query attention, no causal mask, padding keys masked, RoPE on
positions counted over real tokens as Dream's own sampler does).

**Logit shift.** Dream was trained as its AR initialisation was: the hidden state at
position ``i - 1`` predicts token ``i`` (its sampler shifts, ``cat([logits[:, :1],
logits[:, :-1]])``). This model returns position-aligned logits (``logits[:, i]`` scores
token ``i``) so no consumer needs to know. A cached forward whose first new position is
``s`` also recomputes position ``s - 1`` (taking its token and position from the cache and
masking its stale cached key), so the cache costs one extra position and scores ``s`` as
a full forward would.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from embr_rl.core.models.modeling import EmbrDiffusionOutput, KVCache, SwiGLU
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

_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_dropout": 0.0,
    "mask_token_id": 151666,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}


class DreamNativeConfig(PretrainedConfig):
    """Dream's config.json, read with the hub's key names and defaults."""

    model_type = "Dream"

    def __init__(self, tie_word_embeddings: bool = False, **kwargs: Any) -> None:
        for key, default in _DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        # transformers 5 turns ``rope_scaling`` into its own ``rope_parameters``; keep the
        # checkpoint's value apart (only the default RoPE is supported, see check_supported).
        self.hub_rope_scaling = kwargs.pop("rope_scaling", None)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # Kept under its own name: the model ties (or not) by itself, transformers never does.
        self.tie_embeddings = bool(tie_word_embeddings)
        kwargs.pop("use_cache", None)
        self.use_cache = False
        super().__init__(tie_word_embeddings=False, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The hub's layout again: ``tie_word_embeddings`` carries the model's own tying."""
        out = super().to_dict()
        out["tie_word_embeddings"] = out.pop("tie_embeddings", False)
        out["rope_scaling"] = out.pop("hub_rope_scaling", None)
        out.pop("rope_parameters", None)
        return out

    def check_supported(self) -> None:
        """Fail clearly on the config.json options this implementation does not cover."""
        problems = []
        scaling = self.hub_rope_scaling
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            problems.append(f"rope_scaling={scaling!r} (only the default RoPE)")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu')")
        heads = self.num_attention_heads
        if self.hidden_size % heads or (self.hidden_size // heads) % 2:
            problems.append("hidden_size must split into heads of even size")
        if heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if problems:
            raise ValueError(
                "the native Dream implementation does not support "
                + "; ".join(problems)
                + "; use model.implementation=remote with the checkpoint's own code"
            )


class _DreamAttention(nn.Module):
    def __init__(self, cfg: DreamNativeConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.n_heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = h // self.n_heads
        self.dropout = float(cfg.attention_dropout)
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = rotate(q, cos, sin, full_precision=False)
        k = rotate(k, cos, sin, full_precision=False)
        drop = self.dropout if self.training else 0.0
        att = grouped_attention(q, k, v, attn_mask, past, drop)
        return self.o_proj(att.transpose(1, 2).reshape(b, t, -1)), (k, v)


class _DreamLayer(nn.Module):
    def __init__(self, cfg: DreamNativeConfig) -> None:
        super().__init__()
        self.input_layernorm = HubRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _DreamAttention(cfg)
        self.post_attention_layernorm = HubRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)  # gate_proj / up_proj / down_proj, as Qwen2 names them

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class DreamNativeModel(PreTrainedModel):
    """Dream's denoiser with the project's model interface and position-aligned logits."""

    config_class = DreamNativeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["_DreamLayer"]  # noqa: RUF012  (transformers convention)
    _supports_sdpa = True

    def __init__(self, config: DreamNativeConfig) -> None:
        super().__init__(config)
        config.check_supported()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, config.pad_token_id
        )
        self.model.layers = nn.ModuleList(
            _DreamLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.model.norm = HubRMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_hub_weights(module, float(self.config.initializer_range))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.embed_tokens if self.config.tie_embeddings else self.lm_head

    def _unshifted(
        self,
        input_ids: torch.Tensor,
        key_mask: torch.Tensor,
        position_ids: torch.Tensor,
        kv_cache: KVCache | None,
        output_hidden_states: bool,
    ) -> tuple[
        torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]
    ]:
        """Dream's own logits (position ``i`` predicts token ``i + 1``), final hidden states,
        new keys/values and the hidden states entering each layer."""
        attn_mask, _ = attention_mask_for(key_mask, kv_cache)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_tables(
            position_ids,
            self.config.hidden_size // self.config.num_attention_heads,
            self.config.rope_theta,
        )
        x, keys, values, hidden = run_layers(
            self.model.layers,
            x,
            cos,
            sin,
            attn_mask,
            kv_cache,
            checkpointing=self.gradient_checkpointing and self.training,
            output_hidden_states=output_hidden_states,
        )
        x = self.model.norm(x)
        head = self.get_output_embeddings().weight
        return F.linear(x, head), x, keys, values, hidden

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
        """Position-aligned logits [B, T, V] for ``input_ids`` [B, T] (interface of
        :meth:`embr_rl.core.models.EmbrDiffusionModel.forward`). ``logits[:, 0]`` of a full
        forward has no predecessor and is Dream's own first logit, as in its sampler."""
        position_ids, key_mask = positions_and_keys(
            input_ids, attention_mask, position_ids, kv_cache, count_real=True
        )
        if kv_cache is None:
            raw, x, keys, values, hidden = self._unshifted(
                input_ids, key_mask, position_ids, None, output_hidden_states
            )
            logits = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
            cache = KVCache(keys, values, key_mask, position_ids, input_ids) if use_cache else None
            return EmbrDiffusionOutput(
                logits=logits,
                last_hidden_state=x,
                hidden_states=(*hidden, x) if output_hidden_states else None,
                kv_cache=cache,
            )
        ids, mask, pos, cache = self._with_predecessor(input_ids, key_mask, position_ids, kv_cache)
        raw, x, keys, values, hidden = self._unshifted(ids, mask, pos, cache, output_hidden_states)
        new_cache = (
            KVCache(
                [k[:, :, 1:] for k in keys],
                [v[:, :, 1:] for v in values],
                key_mask,
                position_ids,
                input_ids,
            )
            if use_cache
            else None
        )
        return EmbrDiffusionOutput(
            logits=raw[:, :-1],
            last_hidden_state=x[:, 1:],
            hidden_states=tuple(h[:, 1:] for h in (*hidden, x)) if output_hidden_states else None,
            kv_cache=new_cache,
        )

    @staticmethod
    def _with_predecessor(
        input_ids: torch.Tensor,
        key_mask: torch.Tensor,
        position_ids: torch.Tensor,
        kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache]:
        """Prepend, per row, the cached token one position before the first new one; its
        cached key is masked so the recomputed one stands in for it."""
        if kv_cache.positions is None or kv_cache.token_ids is None:
            raise ValueError(
                "a cached forward of Dream needs a cache made by Dream (with positions and "
                "token ids), to score its first new position from the token before it"
            )
        prev = position_ids[:, :1] - 1
        hit = kv_cache.key_mask.bool() & (kv_cache.positions == prev)
        if not bool(hit.any(dim=1).all()):
            raise ValueError(
                "a cached forward of Dream needs the position before the first new one in "
                "the cache (every row's first new token must follow a cached real token)"
            )
        first = hit.long().argmax(dim=1, keepdim=True)
        token = kv_cache.token_ids.gather(1, first)
        cache = replace(kv_cache, key_mask=kv_cache.key_mask.bool() & ~hit)
        ids = torch.cat([token, input_ids], dim=1)
        mask = torch.cat([torch.ones_like(key_mask[:, :1]), key_mask], dim=1)
        return ids, mask, torch.cat([prev, position_ids], dim=1), cache
