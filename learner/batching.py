"""Buffer rows -> :class:`embr_rl.core.losses.LossBatch`, rank shards and micro-batches.

Prompts are left-padded (with an attention mask), completions right-padded, and the
likelihood span is built with :func:`embr_rl.core.masking.span_mask` (``algo.likelihood_span``)
over the real completion positions. A :class:`buffer.PairBatch` becomes rows interleaved
``first[0], second[0], first[1], ...`` with ``pairs = [[0, 1], [2, 3], ...]``, so any split
on an even row boundary keeps every pair whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from embr_rl.core.experience import NO_MASK_SEED, PairBatch, token_matrix
from embr_rl.core.losses import LossBatch, LossModels
from embr_rl.core.masking import span_mask

__all__ = ["TokenIds", "pairs_to_batch", "rows_to_batch", "shard", "split_batch", "to_loss_batch"]


@dataclass(frozen=True)
class TokenIds:
    """Special ids the converter needs: padding, and the stop ids (EOS, then end-of-turn
    ids such as ``<|eot_id|>``) that end ``likelihood_span='until_eos'``."""

    pad_id: int = 0
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()


def _left_pad(table: pa.Table, column: str, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    right, lengths = token_matrix(table, column, pad_id=pad_id)
    width = right.shape[1]
    if width == 0:
        return right, np.zeros_like(right, dtype=bool)
    # Left-padded position j holds right-padded position (j + len) mod width.
    src = (np.arange(width)[None, :] + lengths[:, None]) % width
    left = np.take_along_axis(right, src, axis=1)
    valid = np.arange(width)[None, :] >= (width - lengths)[:, None]
    return left, valid


def rows_to_batch(
    table: pa.Table,
    models: LossModels,
    *,
    ids: TokenIds,
    span: str = "window",
    device: torch.device | str = "cpu",
    pairs: Tensor | None = None,
) -> LossBatch:
    """A :class:`LossBatch` of ``table``'s rows (buffer schema); group ids from ``group_id``."""
    if table.num_rows == 0:
        raise ValueError("cannot build a learner batch from 0 rows")
    prompt, pvalid = _left_pad(table, "prompt_ids", ids.pad_id)
    comp, lengths = token_matrix(table, "completion_ids", pad_id=ids.pad_id)
    cvalid = np.arange(comp.shape[1])[None, :] < lengths[:, None]
    _, groups = np.unique(
        np.asarray(table.column("group_id").to_pylist(), dtype=object), return_inverse=True
    )
    completion = torch.from_numpy(comp)
    old_logp, prompt_masks = _behaviour_logp(table, lengths, comp.shape[1], prompt.shape)
    seeds, ref_lower, ref_upper = _reference_cache(table, lengths, comp.shape[1])
    mask = span_mask(
        completion,
        span=span,
        eos_id=ids.eos_id,
        stop_ids=ids.stop_ids,
        valid=torch.from_numpy(cvalid),
    )
    return LossBatch(
        prompt_ids=torch.from_numpy(prompt).to(device),
        completion_ids=completion.to(device),
        rewards=torch.from_numpy(table.column("reward").to_numpy().astype(np.float32)).to(device),
        group_ids=torch.from_numpy(groups.astype(np.int64).reshape(-1)).to(device),
        models=models,
        prompt_attention_mask=None
        if pvalid.all()
        else torch.from_numpy(pvalid.astype(np.int64)).to(device),
        completion_mask=None if bool(mask.all()) else mask.to(device),
        pairs=None if pairs is None else pairs.to(device),
        old_token_logp=None if old_logp is None else old_logp.to(device),
        prompt_masks=None if prompt_masks is None else prompt_masks.to(device),
        mask_seeds=None if seeds is None else seeds.to(device),
        ref_lower=None if ref_lower is None else ref_lower.to(device),
        ref_upper=None if ref_upper is None else ref_upper.to(device),
    )


def _reference_cache(
    table: pa.Table, lengths: np.ndarray, width: int
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(mask_seeds, ref_lower, ref_upper)`` [B] when every row has a mask seed and is as
    wide as the batch (its draws are then the ones it was scored on), else all None; the
    reference's ELBO (EUBO) from ``ref_energies`` only when every row has one."""
    if "mask_seed" not in table.column_names or not len(lengths) or not (lengths == width).all():
        return None, None, None
    seeds = table.column("mask_seed").to_numpy()
    if (seeds == NO_MASK_SEED).any():
        return None, None, None

    values, counts = token_matrix(table, "ref_energies", length=2, dtype=np.float64)
    seeds_t = torch.from_numpy(seeds.astype(np.int64))
    if not (counts >= 1).all():
        return seeds_t, None, None
    upper = torch.from_numpy(values[:, 1].copy()) if (counts == 2).all() else None
    return seeds_t, torch.from_numpy(values[:, 0].copy()), upper


def _behaviour_logp(
    table: pa.Table, lengths: np.ndarray, width: int, prompt_shape: tuple[int, ...]
) -> tuple[Tensor | None, Tensor | None]:
    """The recorded behaviour log-probs with the (empty) prompt masks they were scored with:
    [B, L] (d1: one per completion token) when every row has one per token, [B, n * L]
    (UniGRPO: one per token of each of its ``n`` seeded draws, the loss reshapes) when every
    row is ``width`` wide and has ``n * width`` of them; otherwise ``(None, None)`` (the loss
    then takes the current policy as the old one)."""
    if "behaviour_logp" not in table.column_names or not len(lengths) or width == 0:
        return None, None
    logp, recorded = token_matrix(table, "behaviour_logp", dtype=np.float32)
    zeros = torch.zeros(prompt_shape, dtype=torch.bool)
    if not (lengths > 0).all():
        return None, None
    if (recorded == lengths).all():
        return torch.from_numpy(np.ascontiguousarray(logp[:, :width])), zeros
    per_row = int(recorded[0])
    full = (lengths == width).all() and (recorded == per_row).all()
    if full and per_row > 0 and per_row % width == 0:
        return torch.from_numpy(logp), zeros
    return None, None


def pairs_to_batch(
    pair_batch: PairBatch,
    models: LossModels,
    *,
    ids: TokenIds,
    span: str = "window",
    device: torch.device | str = "cpu",
) -> LossBatch:
    """Rows interleaved ``first[i], second[i]`` with explicit ``pairs`` [n, 2]."""
    n = len(pair_batch)
    both = pa.concat_tables([pair_batch.first, pair_batch.second])
    order = np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)
    pairs = torch.arange(2 * n, dtype=torch.long).view(n, 2)
    # Pairs share a prompt by construction: group by prompt, whatever group_id says.
    rows = both.take(pa.array(order)).set_column(
        both.schema.get_field_index("group_id"),
        "group_id",
        both.take(pa.array(order)).column("prompt_id"),
    )
    return rows_to_batch(rows, models, ids=ids, span=span, device=device, pairs=pairs)


def to_loss_batch(
    data: pa.Table | PairBatch | LossBatch,
    models: LossModels,
    *,
    ids: TokenIds,
    span: str = "window",
    device: torch.device | str = "cpu",
) -> LossBatch:
    """Dispatch on what the buffer returned (``sample`` -> Table, ``sample_pairs`` -> PairBatch)."""
    if isinstance(data, LossBatch):
        return data
    if isinstance(data, PairBatch):
        return pairs_to_batch(data, models, ids=ids, span=span, device=device)
    if isinstance(data, pa.Table):
        return rows_to_batch(data, models, ids=ids, span=span, device=device)
    raise TypeError(
        f"cannot train on {type(data).__name__}; expected a Table, PairBatch or LossBatch"
    )


def shard(data: pa.Table | PairBatch, rank: int, world_size: int) -> pa.Table | PairBatch:
    """Rank ``rank``'s contiguous share of a global batch (rows, or pairs of a PairBatch)."""
    n = len(data) if isinstance(data, PairBatch) else data.num_rows
    if n % world_size:
        raise ValueError(f"a batch of {n} cannot be split evenly over {world_size} ranks")
    size = n // world_size
    if isinstance(data, PairBatch):
        return PairBatch(
            data.first.slice(rank * size, size),
            data.second.slice(rank * size, size),
            data.equal_reward_share,
        )
    return data.slice(rank * size, size)


def _select(batch: LossBatch, rows: Tensor, pairs: Tensor | None) -> LossBatch:
    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[rows]

    return LossBatch(
        prompt_ids=batch.prompt_ids[rows],
        completion_ids=batch.completion_ids[rows],
        rewards=batch.rewards[rows],
        group_ids=batch.group_ids[rows],
        models=batch.models,
        prompt_attention_mask=pick(batch.prompt_attention_mask),
        completion_mask=pick(batch.completion_mask),
        pairs=pairs,
        old_token_logp=pick(batch.old_token_logp),
        prompt_masks=pick(batch.prompt_masks),
        mask_seeds=pick(batch.mask_seeds),
        ref_lower=pick(batch.ref_lower),
        ref_upper=pick(batch.ref_upper),
    )


def split_batch(batch: LossBatch, num: int) -> list[LossBatch]:
    """``num`` micro-batches: contiguous rows, or (with ``pairs``) contiguous pairs, kept whole."""
    if num == 1:
        return [batch]
    if batch.pairs is None:
        n = batch.completion_ids.shape[0]
        if n < num:
            raise ValueError(f"{n} rows cannot fill {num} micro-batches")
        return [_select(batch, idx, None) for idx in torch.arange(n).tensor_split(num)]
    pairs = batch.pairs.cpu()
    if len(pairs) < num:
        raise ValueError(f"{len(pairs)} pairs cannot fill {num} micro-batches")
    out = []
    for chunk in pairs.tensor_split(num):
        rows, local = torch.unique(chunk.reshape(-1), return_inverse=True)
        out.append(
            _select(
                batch, rows.to(batch.rewards.device), local.view(-1, 2).to(batch.rewards.device)
            )
        )
    return out


def batch_stats(batch: pa.Table | PairBatch, version: int) -> dict[str, float]:
    """Staleness (learner ``version`` minus each online row's ``policy_version``; offline rows,
    version < 0, are left out) and reward mean of a sampled batch, as ``learner/...`` metrics."""
    tables = [batch.first, batch.second] if isinstance(batch, PairBatch) else [batch]
    versions = np.concatenate([t.column("policy_version").to_numpy() for t in tables])
    rewards = np.concatenate([t.column("reward").to_numpy() for t in tables])
    online = versions[versions >= 0]
    out = {"learner/batch_reward_mean": float(rewards.mean()) if len(rewards) else 0.0}
    if len(online):
        stale = version - online
        out["learner/staleness_mean"] = float(stale.mean())
        out["learner/staleness_max"] = float(stale.max())
    return out
