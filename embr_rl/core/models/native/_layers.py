"""Pieces the native LLaDA and Dream implementations share: RMSNorm as both hub files
compute it, rotary tables, grouped-query attention over an optional key/value cache, and
the layer loop with gradient checkpointing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from embr_rl.core.models.modeling import KVCache

# One layer: (x, cos, sin, attn_mask, past) -> (x, (rotated keys, values)).
Layer = Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


class HubRMSNorm(nn.Module):
    """``weight * (x / rms(x))`` with the normalisation in float32 and the product in the
    input's dtype, the order both LLaDA's ``RMSLayerNorm`` and Dream's ``DreamRMSNorm`` use."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin ``[B, 1, T, head_dim]`` of ``position_ids`` [B, T]:
    angle ``p * theta^(-2j/d)`` for the pair ``j``, repeated over both halves."""
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
        )
    )
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, full_precision: bool
) -> torch.Tensor:
    """Rotate-half RoPE. ``full_precision``: in float32 and cast back (LLaDA's
    ``rope_full_precision``); otherwise in ``x``'s dtype with the tables cast to it (Dream)."""
    if full_precision:
        xf = x.float()
    else:
        xf, cos, sin = x, cos.to(x.dtype), sin.to(x.dtype)
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def attention_mask_for(
    key_mask: torch.Tensor, past: KVCache | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The SDPA boolean mask ``[B, 1, 1, S]`` over cached + new keys (None when every key
    is real) and the new positions' key mask. A row with no real key attends everywhere
    (LLaDA's finite padding bias gives the same uniform weights) instead of NaN."""
    full = key_mask if past is None else torch.cat([past.key_mask.bool(), key_mask], dim=1)
    if bool(full.all()):
        return None, key_mask
    empty = ~full.any(dim=1, keepdim=True)
    return (full | empty)[:, None, None, :], key_mask


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    dropout: float,
) -> torch.Tensor:
    """Bidirectional SDPA of ``q`` [B, H, T, D] over past + new keys/values [B, KV, S, D];
    key/value heads are repeated ``H / KV`` times (grouped-query attention)."""
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)


def run_layers(
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attn_mask: torch.Tensor | None,
    kv_cache: KVCache | None,
    *,
    checkpointing: bool,
    output_hidden_states: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Apply ``layers``; returns the output, the per-layer new keys and values, and (when
    asked) the hidden state entering each layer."""
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    hidden: list[torch.Tensor] = []
    for i, layer in enumerate(layers):
        if output_hidden_states:
            hidden.append(x)
        past = (kv_cache.keys[i], kv_cache.values[i]) if kv_cache is not None else None
        if checkpointing:
            x, kv = checkpoint(layer, x, cos, sin, attn_mask, past, use_reentrant=False)
        else:
            x, kv = layer(x, cos, sin, attn_mask, past)
        keys.append(kv[0])
        values.append(kv[1])
    return x, keys, values, hidden


def positions_and_keys(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    kv_cache: KVCache | None,
    *,
    count_real: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's position ids ``[B, T]`` and boolean key mask ``[B, T]`` (all real
    without a mask). Default positions are counted over real tokens (``count_real``, so left
    padding does not move them) or are the plain index; RoPE is relative, so both give real
    tokens the same attention, and each family's default follows its own code. A cached
    forward must say where its new positions are."""
    if kv_cache is not None and position_ids is None:
        raise ValueError("position_ids are required when kv_cache is given")
    b, t = input_ids.shape
    if position_ids is None:
        if count_real and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
    if attention_mask is not None:
        return position_ids, attention_mask.bool()
    return position_ids, torch.ones(b, t, dtype=torch.bool, device=input_ids.device)


def init_hub_weights(module: nn.Module, std: float) -> None:
    """The hub classes' ``_init_weights``: normal(0, std) linear and embedding weights (a
    padding row zeroed), zero biases, unit norm gains."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, HubRMSNorm):
        nn.init.ones_(module.weight)
