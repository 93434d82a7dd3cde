"""Confidence-based masked-diffusion decoding with LLaDA's semantics (DESIGN §5).

The completion starts fully masked and is cut into ``gen_length / block_length`` blocks
decoded left to right; ``steps`` are split evenly over the blocks. At each step ``k``
masked positions of the current block are committed, ``k`` following the even split of
the block's masked count over its steps (remainder to the first steps). The committed
positions are those with the highest confidence: the softmax probability of the chosen
token (``low_confidence``) or a uniform random score (``random``). Temperature sampling
is Gumbel-max in float64; temperature 0 is argmax. Committed tokens are never remasked.

Pure PyTorch: no Ray, DeepSpeed or torch.distributed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

REMASKING = ("low_confidence", "random")


@dataclass
class DecodeStats:
    """What one :func:`generate` call cost."""

    forward_passes: int = 0
    tokens_committed: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_committed / self.wall_s if self.wall_s > 0 else 0.0


def num_transfer_tokens(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-step commit counts [B, steps]: the even split of each row's masked count, remainder first."""
    count = masked.sum(dim=1, keepdim=True)
    base = count // steps
    rem = count % steps
    out = base.expand(-1, steps).clone()
    out += (torch.arange(steps, device=masked.device)[None] < rem).long()
    return out


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """``argmax(logits / T + Gumbel)`` in float64 (a sample from ``softmax(logits / T)``); T=0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits64 = logits.to(torch.float64)
    u = torch.rand(logits64.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits64 / temperature + gumbel).argmax(dim=-1)


def _validate(
    prompt_ids: torch.Tensor, gen_length: int, block_length: int, steps: int, mask_id: int,
    temperature: float, remasking: str, cfg_scale: float, threshold: float | None, vocab: int | None,
) -> None:
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [batch, length], got shape {tuple(prompt_ids.shape)}")
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(
            f"gen_length, block_length and steps must be positive; got {gen_length}, {block_length}, {steps}"
        )
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be divisible by block_length ({block_length})")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(
            f"steps ({steps}) must be divisible by the number of blocks gen_length/block_length ({blocks})"
        )
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; allowed: {', '.join(REMASKING)}")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature ({temperature}) and cfg_scale ({cfg_scale}) must be >= 0")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if vocab is not None and not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id {mask_id} is outside the vocabulary (size {vocab})")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    mask_id: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    threshold: float | None = None,
    cache: str | None = None,
    eos_id: int | None = None,
    suppress_eos: bool = False,
    generator: torch.Generator | None = None,
    stats: DecodeStats | None = None,
) -> torch.Tensor:
    """Decode completions for left-padded ``prompt_ids`` [B, P]; returns [B, P + gen_length].

    ``threshold=tau`` commits every masked position of the block whose confidence is at
    least ``tau`` (at least one per step) instead of the fixed schedule. ``stats``, when
    given, is filled with forward passes, tokens committed and wall time.
    """
    if cache is not None:
        raise NotImplementedError("KV-cache decoding is not available yet; use cache=None")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    _validate(prompt_ids, gen_length, block_length, steps, mask_id, temperature, remasking,
              cfg_scale, threshold, vocab)
    if suppress_eos and eos_id is None:
        raise ValueError("suppress_eos=True needs eos_id")
    t0 = time.perf_counter()
    b, p = prompt_ids.shape
    device = prompt_ids.device
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :p] = prompt_ids
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    full_mask = torch.cat(
        [attention_mask.to(torch.long), torch.ones(b, gen_length, dtype=torch.long, device=device)], dim=1
    )
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :p] = True
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    forwards = 0

    def logits_of(seq: torch.Tensor) -> torch.Tensor:
        nonlocal forwards
        if cfg_scale > 0:
            uncond = seq.clone()
            uncond[prompt_index & full_mask.bool()] = mask_id
            both = model(input_ids=torch.cat([seq, uncond]), attention_mask=torch.cat([full_mask, full_mask])).logits
            forwards += 1
            cond, unc = both.chunk(2, dim=0)
            out = unc + (cfg_scale + 1) * (cond - unc)
        else:
            out = model(input_ids=seq, attention_mask=full_mask).logits
            forwards += 1
        if suppress_eos:
            out = out.clone()
            out[..., eos_id] = float("-inf")
        return out

    for blk in range(num_blocks):
        start, end = p + blk * block_length, p + (blk + 1) * block_length
        schedule = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        step = 0
        while bool((x[:, start:end] == mask_id).any()):
            if threshold is None and step >= steps_per_block:
                break
            masked = x == mask_id
            logits = logits_of(x)
            x0 = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                probs = torch.softmax(logits.to(torch.float64), dim=-1)
                conf = torch.gather(probs, -1, x0[..., None]).squeeze(-1)
            else:
                conf = torch.rand(x0.shape, dtype=torch.float64, device=device, generator=generator)
            conf[:, end:] = float("-inf")
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            x0 = torch.where(masked, x0, x)
            if threshold is None:
                k = schedule[:, step]
            else:
                k = (conf >= threshold).sum(dim=1).clamp(min=1)
                k = torch.minimum(k, masked[:, start:end].sum(dim=1))
            order = conf.argsort(dim=1, descending=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(order.shape[1], device=device).expand_as(order))
            commit = (rank < k[:, None]) & masked
            x = torch.where(commit, x0, x)
            step += 1
    if stats is not None:
        stats.forward_passes += forwards
        stats.tokens_committed += int(b * gen_length)
        stats.wall_s += time.perf_counter() - t0
    return x
