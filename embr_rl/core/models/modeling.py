"""The built-in masked-diffusion transformer (a small LLaDA-style denoiser).

A bidirectional transformer (no causal mask) with rotary position embeddings, RMSNorm and
SwiGLU feed-forward blocks that maps a partly masked sequence to logits for every
position. It is a Hugging Face ``PreTrainedModel`` registered with ``AutoConfig`` /
``AutoModel`` under ``model_type="embr_mdm"``, so ``save_pretrained`` /
``from_pretrained`` round-trip through safetensors.

Key/value cache interface (used by the fast decoder, ``actors/decoding.py``):
``forward(..., use_cache=True)`` returns (as ``.kv_cache``) a :class:`KVCache` holding, per layer, the rotated
keys and values of the positions just computed plus a key mask. Passing such a cache as
``kv_cache`` lets a later call compute only some positions (say, the current
block) while attending to the cached ones (the prompt and finished blocks: "prefix"; or
also the positions after the block: "dual"). Attention is bidirectional, so cached keys
may stand anywhere in the sequence; their positions are already baked in by RoPE and the
caller passes ``position_ids`` for the new positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class EmbrDiffusionConfig(PretrainedConfig):
    """Configuration of :class:`EmbrDiffusionModel`."""

    model_type = "embr_mdm"

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 384,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: object,
    ) -> None:
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                f"({num_attention_heads})"
            )
        if (hidden_size // num_attention_heads) % 2:
            raise ValueError(
                "the head dimension hidden_size/num_attention_heads must be even (RoPE)"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


@dataclass
class KVCache:
    """Per-layer rotated keys/values ``[B, kv_heads, S, head_dim]`` and a key mask ``[B, S]``.

    ``positions`` and ``token_ids`` ``[B, S]`` (optional) record where and which token each
    cached entry is; a model whose logits are shifted by one (Dream) needs them to score
    the first new position from the token before it.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor
    positions: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]

    def select_positions(self, index: torch.Tensor | slice) -> KVCache:
        """Keep the cached positions picked by ``index`` (a slice or 1-D index tensor)."""
        return KVCache(
            [k[:, :, index] for k in self.keys],
            [v[:, :, index] for v in self.values],
            self.key_mask[:, index],
            None if self.positions is None else self.positions[:, index],
            None if self.token_ids is None else self.token_ids[:, index],
        )

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """Keep the batch rows in ``rows`` (to stop spending compute on finished rows)."""
        return KVCache(
            [k[rows] for k in self.keys],
            [v[rows] for v in self.values],
            self.key_mask[rows],
            None if self.positions is None else self.positions[rows],
            None if self.token_ids is None else self.token_ids[rows],
        )

    def gather_positions(self, index: torch.Tensor) -> KVCache:
        """Keep, per row ``b``, the cached positions ``index[b]`` (``index`` [B, K]): the rows
        of a continuous batch sit at different blocks, so each keeps its own."""

        def per_row(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B, H, K, D]
            i = index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
            return t.gather(2, i)

        def flat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.gather(1, index)

        mask = flat(self.key_mask)
        assert mask is not None
        return KVCache(
            [per_row(k) for k in self.keys],
            [per_row(v) for v in self.values],
            mask,
            flat(self.positions),
            flat(self.token_ids),
        )

    def write_rows(self, rows: torch.Tensor, other: KVCache) -> None:
        """Overwrite, in place, the batch rows ``rows`` with ``other``'s (same positions count)."""
        for mine, theirs in zip(
            [*self.keys, *self.values], [*other.keys, *other.values], strict=True
        ):
            mine[rows] = theirs.to(mine.dtype)
        self.key_mask[rows] = other.key_mask.to(self.key_mask.dtype)
        for a, b in ((self.positions, other.positions), (self.token_ids, other.token_ids)):
            if a is not None and b is not None:
                a[rows] = b.to(a.dtype)

    def cat(self, other: KVCache) -> KVCache:
        """Concatenate two caches along the position axis."""

        def both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None or b is None else torch.cat([a, b], dim=1)

        return KVCache(
            [torch.cat([a, b], dim=2) for a, b in zip(self.keys, other.keys, strict=True)],
            [torch.cat([a, b], dim=2) for a, b in zip(self.values, other.values, strict=True)],
            torch.cat([self.key_mask, other.key_mask], dim=1),
            both(self.positions, other.positions),
            both(self.token_ids, other.token_ids),
        )


@dataclass
class EmbrDiffusionOutput(ModelOutput):
    """Model output: ``logits`` [B, T, V]; optional hidden states and cache."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    kv_cache: KVCache | None = None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``x / rms(x) * g``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``position_ids`` [B, T]: cos and sin of shape [B, 1, T, head_dim]."""
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
        )
    )
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of the head dimension (the rotate-half form of RoPE)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Bidirectional multi-head attention with RoPE and an optional key/value cache."""

    def __init__(self, cfg: EmbrDiffusionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out), new_kv


class SwiGLU(nn.Module):
    """Gated feed-forward block: ``down(silu(gate(x)) * up(x))`` (also Dream's, whose
    config has the same ``hidden_size`` / ``intermediate_size`` names)."""

    def __init__(self, cfg: PretrainedConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: EmbrDiffusionConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.self_attn(self.attn_norm(x), cos, sin, attn_mask, past)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, kv


class EmbrDiffusionModel(PreTrainedModel):
    """Masked-diffusion denoiser: ``logits = f(input_ids)`` for every position (no causal mask)."""

    config_class = EmbrDiffusionConfig
    base_model_prefix = "embr_mdm"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]  # noqa: RUF012  (Hugging Face convention)
    _supports_sdpa = True

    def __init__(self, config: EmbrDiffusionConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @staticmethod
    def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions counted over real tokens only, so left padding does not shift RoPE."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

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
        """Logits for every position of ``input_ids`` [B, T].

        ``attention_mask`` [B, T] marks real (1) and padding (0) tokens of ``input_ids``;
        padding keys are never attended to. With ``kv_cache`` the new tokens also
        attend to the cached keys, and ``position_ids`` must be given.
        """
        b, t = input_ids.shape
        if kv_cache is not None and position_ids is None:
            raise ValueError("position_ids are required when kv_cache is given")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = self.positions_from_mask(attention_mask)
            else:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        key_mask = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        )
        full_key_mask = (
            torch.cat([kv_cache.key_mask.bool(), key_mask], dim=1)
            if kv_cache is not None
            else key_mask
        )
        attn_mask = None
        if not bool(full_key_mask.all()):
            # A row with no real key at all would give NaN; let it attend everywhere.
            empty = ~full_key_mask.any(dim=1, keepdim=True)
            attn_mask = (full_key_mask | empty)[:, None, None, :]

        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(
            position_ids,
            self.config.hidden_size // self.config.num_attention_heads,
            self.config.rope_theta,
            x.dtype,
        )
        hidden: list[torch.Tensor] = [x] if output_hidden_states else []
        new_keys: list[torch.Tensor] = []
        new_values: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            past = (kv_cache.keys[i], kv_cache.values[i]) if kv_cache is not None else None
            if self.gradient_checkpointing and self.training:
                x, kv = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, attn_mask, past, use_reentrant=False
                )
            else:
                x, kv = layer(x, cos, sin, attn_mask, past)
            if use_cache:
                new_keys.append(kv[0])
                new_values.append(kv[1])
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        if output_hidden_states:
            hidden[-1] = x
        logits = self.lm_head(x)
        return EmbrDiffusionOutput(
            logits=logits,
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            kv_cache=KVCache(new_keys, new_values, key_mask) if use_cache else None,
        )
