"""Confidence-based masked-diffusion decoding with LLaDA's semantics (DESIGN §5).

The completion starts fully masked and is cut into ``gen_length / block_length`` blocks
decoded left to right; ``steps`` are split evenly over the blocks. At each step ``k``
masked positions of the current block are committed, ``k`` following the even split of
the block's masked count over its steps (remainder to the first steps). The committed
positions are those with the highest confidence: the softmax probability of the chosen
token (``low_confidence``) or a uniform random score (``random``). Temperature sampling
is Gumbel-max in float64; temperature 0 is argmax. Committed tokens are never remasked.

Fast modes (each an approximation of the exact mode, measured by ``bench/decode.py``):

- ``threshold=tau``: commit every masked position of the block whose confidence is at
  least ``tau``, and at least as many as exact mode's schedule commits at that step (at
  least one), so a block never takes more forwards than in exact mode; with
  ``steps == gen_length`` this is Fast-dLLM's rule (threshold, else the top one).
- ``cache="prefix"``: Fast-dLLM's prefix cache. Each block starts with one full forward
  that also records keys/values; later steps of the block compute only the block and the
  positions after it, attending to the cached prompt and finished blocks.
- ``cache="dual"``: as ``prefix``, but the positions after the block are cached too and
  each later step computes only the block.
- ``stop_at_eos=True``: a row whose finished block holds a stop id followed only by stop
  ids to the block's end (``text<|eot_id|><|endoftext|>...`` or a block of fill) gets EOS
  to the end of its window and costs no more forwards. The text up to the row's first stop
  id is what exact mode decodes, since later blocks never change earlier ones.

The stop ids are ``eos_id`` followed by ``stop_ids`` (the end-of-turn tokens, e.g. LLaDA's
``<|eot_id|>`` or Qwen's ``<|im_end|>``); ``suppress_eos=True`` bans all of them, and the
fill after a stop is always ``eos_id`` (the first stop id when ``eos_id`` is None).

Rows whose current block is finished (threshold mode) or that stopped are left out of
later forwards. Pure PyTorch: no Ray, DeepSpeed or torch.distributed.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from embr_rl.core.masking import stop_id_set

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("prefix", "dual")


@dataclass
class DecodeStats:
    """What one or more :func:`generate` calls cost.

    ``positions_computed`` counts rows x positions run through the model (summed over
    forwards, classifier-free-guidance rows included): the compute the cache and the
    skipping of finished rows save.
    """

    forward_passes: int = 0
    tokens_committed: int = 0
    wall_s: float = 0.0
    positions_computed: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_committed / self.wall_s if self.wall_s > 0 else 0.0

    def merge(self, other: DecodeStats) -> None:
        """Add ``other``'s counts to this one."""
        self.forward_passes += other.forward_passes
        self.tokens_committed += other.tokens_committed
        self.wall_s += other.wall_s
        self.positions_computed += other.positions_computed


def num_transfer_tokens(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-step commit counts [B, steps]: the even split of each row's masked count, remainder first."""
    count = masked.sum(dim=1, keepdim=True)
    base = count // steps
    rem = count % steps
    out = base.expand(-1, steps).clone()
    out += (torch.arange(steps, device=masked.device)[None] < rem).long()
    return out


def gumbel_argmax(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """``argmax(logits / T + Gumbel)`` in float64 (a sample from ``softmax(logits / T)``); T=0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits64 = logits.to(torch.float64)
    u = torch.rand(logits64.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits64 / temperature + gumbel).argmax(dim=-1)


def supports_kv_cache(model: Any) -> bool:
    """True when ``model.forward`` takes ``kv_cache``, ``position_ids`` and ``use_cache``.

    A peft (LoRA) wrapper forwards every keyword to the model it wraps, so that model's
    signature is the one that counts.
    """
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        model = get_base()
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in ("kv_cache", "position_ids", "use_cache"))


@dataclass(frozen=True)
class _Run:
    """One :func:`generate` call's decoding settings, checked by :func:`_validate` (``stops``
    and ``cache`` as :func:`_stops_and_cache` resolves them)."""

    gen_length: int
    block_length: int
    steps: int
    mask_id: int
    temperature: float
    remasking: str
    cfg_scale: float
    threshold: float | None
    cache: str | None
    stops: tuple[int, ...]
    suppress_eos: bool
    stop_at_eos: bool
    generator: torch.Generator | None


def _validate(
    prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, run: _Run, vocab: int | None
) -> None:
    """Refuse bad arguments of :func:`generate`, naming the argument and what is allowed."""
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [batch, length], got shape {tuple(prompt_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal prompt_ids shape "
            f"{tuple(prompt_ids.shape)}"
        )
    gen, block, steps = run.gen_length, run.block_length, run.steps
    if gen <= 0 or block <= 0 or steps <= 0:
        raise ValueError(
            f"gen_length, block_length and steps must be positive; got {gen}, {block}, {steps}"
        )
    if gen % block:
        raise ValueError(f"gen_length ({gen}) must be divisible by block_length ({block})")
    if steps % (gen // block):
        raise ValueError(
            f"steps ({steps}) must be divisible by the number of blocks "
            f"gen_length/block_length ({gen // block})"
        )
    if run.remasking not in REMASKING:
        raise ValueError(f"unknown remasking {run.remasking!r}; allowed: {', '.join(REMASKING)}")
    if run.temperature < 0 or run.cfg_scale < 0:
        raise ValueError(
            f"temperature ({run.temperature}) and cfg_scale ({run.cfg_scale}) must be >= 0"
        )
    if run.threshold is not None and not 0 < run.threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {run.threshold}")
    if run.cache is not None and run.cache not in CACHE_MODES:
        raise ValueError(f"unknown cache {run.cache!r}; allowed: None, {', '.join(CACHE_MODES)}")
    if vocab is not None and not 0 <= run.mask_id < vocab:
        raise ValueError(f"mask_id {run.mask_id} is outside the vocabulary (size {vocab})")


def _stops_and_cache(
    model: Any,
    mask_id: int,
    cache: str | None,
    eos_id: int | None,
    stop_ids: Sequence[int] | None,
    suppress_eos: bool,
    stop_at_eos: bool,
) -> tuple[tuple[int, ...], str | None]:
    """The stop ids (``eos_id`` first) and the cache mode the model supports (None, with a
    warning, when its forward takes no cache)."""
    stops = stop_id_set(eos_id, stop_ids)
    if (suppress_eos or stop_at_eos) and not stops:
        raise ValueError("suppress_eos=True and stop_at_eos=True need eos_id or stop_ids")
    if mask_id in stops:
        raise ValueError(f"mask_id {mask_id} cannot also be a stop id ({list(stops)})")
    if cache is not None and not supports_kv_cache(model):
        warnings.warn(
            f"{type(model).__name__} has no key/value cache (forward takes no kv_cache, "
            f"position_ids, use_cache); decoding with cache=None instead of {cache!r}",
            stacklevel=3,
        )
        cache = None
    return stops, cache


class _Forward:
    """Runs the model on a subset of rows, with classifier-free guidance and an optional cache.

    With guidance the model batch is the rows followed by their unconditional copies (the
    prompt's real tokens replaced by the mask), so one cache serves both halves.
    """

    def __init__(
        self,
        model: Any,
        full_mask: torch.Tensor,
        prompt_len: int,
        mask_id: int,
        cfg_scale: float,
        banned: Sequence[int],
        stats: DecodeStats,
    ) -> None:
        self.model = model
        self.full_mask = full_mask
        self.positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        self.prompt_len = prompt_len
        self.mask_id = mask_id
        self.cfg_scale = cfg_scale
        # The mask token is never a prediction: committing it would leave the position masked.
        self.banned = list(dict.fromkeys([mask_id, *banned]))
        self.stats = stats

    @classmethod
    def of_run(
        cls, model: Any, full_mask: torch.Tensor, prompt_len: int, run: _Run, stats: DecodeStats
    ) -> _Forward:
        """The forward of one :func:`generate` call (the stop ids banned with ``suppress_eos``)."""
        banned = run.stops if run.suppress_eos else ()
        return cls(model, full_mask, prompt_len, run.mask_id, run.cfg_scale, banned, stats)

    def _inputs(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq, mask = x[rows], self.full_mask[rows]
        if self.cfg_scale > 0:
            uncond = seq.clone()
            prompt = uncond[:, : self.prompt_len]
            prompt[mask[:, : self.prompt_len].bool()] = self.mask_id
            seq, mask = torch.cat([seq, uncond]), torch.cat([mask, mask])
        return seq, mask

    def _rows2(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows]) if self.cfg_scale > 0 else rows

    def _finish(self, logits: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        self.stats.forward_passes += 1
        self.stats.positions_computed += seq.numel()
        if self.cfg_scale > 0:
            cond, unc = logits.chunk(2, dim=0)
            logits = unc + (self.cfg_scale + 1) * (cond - unc)
        banned = [i for i in self.banned if i < logits.shape[-1]]
        if banned:
            logits = logits.clone()
            logits[..., banned] = float("-inf")
        return logits

    def full(self, x: torch.Tensor, rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Block logits [R, end - start, V] from a forward over the whole sequence."""
        seq, mask = self._inputs(x, rows)
        logits = self.model(input_ids=seq, attention_mask=mask).logits
        return self._finish(logits[:, start:end], seq)

    def full_with_cache(
        self, x: torch.Tensor, rows: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, Any]:
        """Like :meth:`full`, also returning the keys/values of every position."""
        seq, mask = self._inputs(x, rows)
        out = self.model(
            input_ids=seq,
            attention_mask=mask,
            position_ids=self.positions[self._rows2(rows)],
            use_cache=True,
        )
        return self._finish(out.logits[:, start:end], seq), out.kv_cache

    def partial(
        self, x: torch.Tensor, rows: torch.Tensor, start: int, stop: int, end: int, kv: Any
    ) -> torch.Tensor:
        """Block logits computing only positions ``start:stop`` against the cache ``kv``."""
        rows2 = self._rows2(rows)
        seq = x[rows2, start:stop]
        out = self.model(
            input_ids=seq,
            attention_mask=torch.ones_like(seq),
            position_ids=self.positions[rows2, start:stop],
            kv_cache=kv,
        )
        return self._finish(out.logits[:, : end - start], seq)

    def _idx2(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([idx, idx]) if self.cfg_scale > 0 else idx

    def rows_full(
        self, x: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, *, with_cache: bool
    ) -> tuple[torch.Tensor, Any]:
        """Logits [R, bl, V] at each row's own block positions ``idx`` [R, bl] from a forward
        over the whole sequence, and with ``with_cache`` the keys/values of every position."""
        seq, mask = self._inputs(x, rows)
        if with_cache:
            out = self.model(
                input_ids=seq,
                attention_mask=mask,
                position_ids=self.positions[self._rows2(rows)],
                use_cache=True,
            )
        else:
            out = self.model(input_ids=seq, attention_mask=mask)
        i = self._idx2(idx)
        logits = out.logits.gather(1, i[..., None].expand(-1, -1, out.logits.shape[-1]))
        return self._finish(logits, seq), out.kv_cache if with_cache else None

    def rows_partial(
        self, x: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, kv: Any
    ) -> torch.Tensor:
        """Logits [R, bl, V] computing only each row's block ``idx`` against the cache ``kv``."""
        rows2, i = self._rows2(rows), self._idx2(idx)
        seq = x[rows2].gather(1, i)
        out = self.model(
            input_ids=seq,
            attention_mask=torch.ones_like(seq),
            position_ids=self.positions[rows2].gather(1, i),
            kv_cache=kv,
        )
        return self._finish(out.logits, seq)


def _commit_block(
    block: torch.Tensor,
    logits: torch.Tensor,
    k_schedule: torch.Tensor | None,
    run: _Run,
) -> torch.Tensor:
    """One step on the block [R, L]: commit the ``k`` most confident masked positions.

    ``k`` is the schedule's count, or with ``threshold`` the number of masked positions at
    or above it, raised to the schedule's count (at least one).
    """
    masked = block == run.mask_id
    x0 = gumbel_argmax(logits, run.temperature, run.generator)
    if run.remasking == "low_confidence":
        lf = logits.float()
        conf = (lf.gather(-1, x0[..., None]).squeeze(-1) - lf.logsumexp(-1)).exp()
    else:
        conf = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=run.generator)
    conf = conf.masked_fill(~masked, float("-inf"))
    if run.threshold is None:
        k = k_schedule
    else:
        k = (conf >= run.threshold).sum(1).clamp(min=1)
        if k_schedule is not None:
            k = torch.maximum(k, k_schedule)
        k = torch.minimum(k, masked.sum(1))
    k_max = int(k.max())
    commit = torch.zeros_like(masked)
    if k_max > 0:
        top = conf.topk(k_max, dim=1).indices
        commit.scatter_(1, top, torch.arange(k_max, device=block.device)[None] < k[:, None])
    return torch.where(commit & masked, x0, block)


def _ends_in_stops(block: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """[R] True where the block [R, L] holds a stop id and only stop ids follow its first one."""
    is_stop = torch.isin(block, stops)
    seen = is_stop.cumsum(1) > 0  # at or after the row's first stop id in the block
    return is_stop.any(1) & (is_stop | ~seen).all(1)


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
    stop_ids: Sequence[int] | None = None,
    suppress_eos: bool = False,
    stop_at_eos: bool = False,
    slots: int | None = None,
    generator: torch.Generator | None = None,
    stats: DecodeStats | None = None,
) -> torch.Tensor:
    """Decode completions for left-padded ``prompt_ids`` [B, P]; returns [B, P + gen_length].

    ``threshold``, ``cache`` and ``stop_at_eos`` select the fast modes (module docstring);
    a model without a key/value cache falls back to ``cache=None`` with a warning.
    ``suppress_eos`` and ``stop_at_eos`` act on every stop id: ``eos_id``, then ``stop_ids``.
    ``stats``, when given, is added to: forward passes, tokens committed (``B * gen_length``),
    positions computed and wall time. Masked tokens inside the prompt are left as they are.

    ``slots=S`` turns on continuous batching: ``S`` rows decode at once, each at its own
    block and step; a row that finishes (its last block, or a stop with ``stop_at_eos``)
    leaves, and the next prompt takes its slot at once, so rows never wait for other rows'
    blocks. Every row goes through exactly the operations the batched schedule applies to it
    (one full forward at the start of each of its blocks, with ``cache="dual"`` recording the
    keys/values of the positions outside the block, then block-only forwards), so with
    ``temperature=0`` each row decodes to the same tokens; at a temperature the random draws
    are taken in another order. ``cache="prefix"`` is refused with slots (its cached span
    would differ in length from row to row).
    """
    run = _Run(
        gen_length,
        block_length,
        steps,
        mask_id,
        temperature,
        remasking,
        cfg_scale,
        threshold,
        cache,
        (),
        suppress_eos,
        stop_at_eos,
        generator,
    )
    _validate(
        prompt_ids, attention_mask, run, getattr(getattr(model, "config", None), "vocab_size", None)
    )
    if slots is not None and slots < 1:
        raise ValueError(f"slots must be >= 1 (or None for one static batch), got {slots}")
    if slots is not None and cache == "prefix":
        raise ValueError(
            "continuous batching (slots) supports cache=None or 'dual', not 'prefix' (the "
            "cached prefix would have a different length in every slot)"
        )
    stops, cache = _stops_and_cache(
        model, mask_id, cache, eos_id, stop_ids, suppress_eos, stop_at_eos
    )
    run = replace(run, stops=tuple(stops), cache=cache)
    t0 = time.perf_counter()
    call_stats = DecodeStats()
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    if slots is None:
        out = _decode_batch(model, prompt_ids, attention_mask, run, call_stats)
    else:
        out = _decode_slots(model, prompt_ids, attention_mask, slots, run, call_stats)
    call_stats.tokens_committed = prompt_ids.shape[0] * gen_length
    call_stats.wall_s = time.perf_counter() - t0
    if stats is not None:
        stats.merge(call_stats)
    return out


def _decode_batch(  # noqa: C901  (the block/step schedule and its fast modes in one loop)
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    run: _Run,
    call_stats: DecodeStats,
) -> torch.Tensor:
    """One static batch: every row decodes block by block together (:func:`generate`)."""
    b, p = prompt_ids.shape
    device = prompt_ids.device
    x = torch.full((b, p + run.gen_length), run.mask_id, dtype=torch.long, device=device)
    x[:, :p] = prompt_ids
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    full_mask = torch.cat(
        [
            attention_mask.to(torch.long),
            torch.ones(b, run.gen_length, dtype=torch.long, device=device),
        ],
        dim=1,
    )
    fwd = _Forward.of_run(model, full_mask, p, run, call_stats)
    stop_table = torch.tensor(run.stops, dtype=torch.long, device=device)
    steps_per_block = run.steps // (run.gen_length // run.block_length)
    live = torch.arange(b, device=device)  # rows not stopped

    for start in range(p, p + run.gen_length, run.block_length):
        end = start + run.block_length
        if live.numel() == 0:
            break
        schedule = num_transfer_tokens(x[live, start:end] == run.mask_id, steps_per_block)
        kv = None
        rows, sched_row = live, torch.arange(live.numel(), device=device)
        step = 0
        while run.threshold is not None or step < steps_per_block:
            if step > 0:
                pending = (x[rows, start:end] == run.mask_id).any(1)
                if not bool(pending.all()):
                    keep = pending.nonzero().squeeze(1)
                    if kv is not None:
                        both = torch.cat([keep, keep + rows.numel()]) if run.cfg_scale > 0 else keep
                        kv = kv.select_rows(both)
                    rows, sched_row = rows[keep], sched_row[keep]
                if rows.numel() == 0:
                    break
            if run.cache is None:
                logits = fwd.full(x, rows, start, end)
            elif step == 0:
                logits, full_kv = fwd.full_with_cache(x, rows, start, end)
                if run.cache == "prefix":
                    kv = full_kv.select_positions(slice(0, start))
                else:
                    keep = torch.cat(
                        [
                            torch.arange(start, device=device),
                            torch.arange(end, p + run.gen_length, device=device),
                        ]
                    )
                    kv = full_kv.select_positions(keep)
            else:
                stop = p + run.gen_length if run.cache == "prefix" else end
                logits = fwd.partial(x, rows, start, stop, end, kv)
            k = schedule[sched_row, step] if step < steps_per_block else None
            x[rows, start:end] = _commit_block(x[rows, start:end], logits, k, run)
            step += 1
        if run.stop_at_eos:
            ended = _ends_in_stops(x[live, start:end], stop_table)
            x[live[ended], end:] = run.stops[0]
            live = live[~ended]

    return x


def _rows_like(kv: Any, rows: int) -> Any:
    """An all-zero cache shaped like ``kv`` with ``rows`` batch rows (the slots' store)."""

    def blank(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.new_zeros((rows, *t.shape[1:]))

    return type(kv)(
        [blank(k) for k in kv.keys],
        [blank(v) for v in kv.values],
        blank(kv.key_mask),
        blank(kv.positions),
        blank(kv.token_ids),
    )


def _decode_slots(  # noqa: C901, PLR0915  (the slots' schedule in one loop)
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    slots: int,
    run: _Run,
    call_stats: DecodeStats,
) -> torch.Tensor:
    """Continuous batching through ``slots`` rows (:func:`generate` with ``slots``)."""
    n, p = prompt_ids.shape
    device = prompt_ids.device
    width = p + run.gen_length
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    out = torch.full((n, width), run.mask_id, dtype=torch.long, device=device)
    out[:, :p] = prompt_ids
    s = min(slots, n)
    x = torch.full((s, width), run.mask_id, dtype=torch.long, device=device)
    full_mask = torch.zeros((s, width), dtype=torch.long, device=device)
    fwd = _Forward.of_run(model, full_mask, p, run, call_stats)
    stop_table = torch.tensor(run.stops, dtype=torch.long, device=device)
    blocks = run.gen_length // run.block_length
    per_block = run.steps // blocks
    request = torch.full((s,), -1, dtype=torch.long, device=device)
    block = torch.zeros(s, dtype=torch.long, device=device)
    step = torch.zeros(s, dtype=torch.long, device=device)
    schedule = torch.zeros((s, per_block), dtype=torch.long, device=device)
    offsets = torch.arange(run.block_length, device=device)
    everywhere = torch.arange(width, device=device)
    store: Any = None  # the dual cache of every slot: positions outside its block
    queued = 0

    def admit(slot: int) -> None:
        nonlocal queued
        if queued >= n:
            request[slot] = -1
            return
        x[slot] = run.mask_id
        x[slot, :p] = prompt_ids[queued]
        full_mask[slot, :p] = attention_mask[queued].to(torch.long)
        full_mask[slot, p:] = 1
        fwd.positions[slot] = (full_mask[slot].cumsum(-1) - 1).clamp(min=0)
        request[slot], block[slot], step[slot] = queued, 0, 0
        queued += 1

    for slot in range(s):
        admit(slot)
    while True:
        rows = (request >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        starts = p + block[rows] * run.block_length
        idx = starts[:, None] + offsets  # [R, bl]: each row's block
        fresh = step[rows] == 0
        if bool(fresh.any()):
            blk = x[rows[fresh]].gather(1, idx[fresh])
            schedule[rows[fresh]] = num_transfer_tokens(blk == run.mask_id, per_block)
        if run.cache is None:
            logits, _ = fwd.rows_full(x, rows, idx, with_cache=False)
        else:
            parts: list[tuple[torch.Tensor, torch.Tensor]] = []
            if bool(fresh.any()):
                r0, i0 = rows[fresh], idx[fresh]
                lg, kv = fwd.rows_full(x, r0, i0, with_cache=True)
                outside = everywhere[None].expand(len(r0), -1)
                keep = outside[(outside < i0[:, :1]) | (outside > i0[:, -1:])].view(len(r0), -1)
                kv = kv.gather_positions(fwd._idx2(keep))
                if store is None:
                    store = _rows_like(kv, 2 * s if run.cfg_scale > 0 else s)
                store.write_rows(torch.cat([r0, r0 + s]) if run.cfg_scale > 0 else r0, kv)
                parts.append((fresh.nonzero().squeeze(1), lg))
            if not bool(fresh.all()):
                r1, i1 = rows[~fresh], idx[~fresh]
                both = torch.cat([r1, r1 + s]) if run.cfg_scale > 0 else r1
                lg = fwd.rows_partial(x, r1, i1, store.select_rows(both))
                parts.append(((~fresh).nonzero().squeeze(1), lg))
            logits = parts[0][1].new_empty((rows.numel(), *parts[0][1].shape[1:]))
            for where, lg in parts:
                logits[where] = lg
        at = step[rows]
        k = schedule[rows, at.clamp(max=per_block - 1)] * (at < per_block)
        blk = x[rows].gather(1, idx)
        blk = _commit_block(blk, logits, k, run)
        x[rows] = x[rows].scatter(1, idx, blk)
        step[rows] += 1
        done = (blk != run.mask_id).all(1)
        for j in done.nonzero().squeeze(1).tolist():
            slot = int(rows[j])
            ended = run.stop_at_eos and bool(_ends_in_stops(blk[j : j + 1], stop_table)[0])
            if ended:
                x[slot, int(idx[j, -1]) + 1 :] = run.stops[0]
            if ended or int(block[slot]) == blocks - 1:
                out[int(request[slot])] = x[slot]
                admit(slot)
            else:
                block[slot] += 1
                step[slot] = 0

    return out
