"""Enumerable toy models and exact (enumerated) likelihood quantities for the objective tests.

Completion positions ``0..L-1`` follow a prompt of length ``P``; the real vocabulary is
``0..V-1`` and the mask id is ``V``. Every expectation here is computed exactly by listing
all masks (and all orders for ``p_mix``), never by sampling.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Out:
    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class TinyNet(nn.Module):
    """An arbitrary (inconsistent) bidirectional network: embeddings -> MLP over the whole sequence."""

    def __init__(self, vocab: int, seq_len: int, *, seed: int, width: int = 8, hidden: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.seq_len = vocab, seq_len
        self.emb = nn.Parameter(torch.randn(vocab + 1, width, generator=g, dtype=torch.float64))
        self.w1 = nn.Parameter(
            torch.randn(seq_len * width, hidden, generator=g, dtype=torch.float64) / 3
        )
        self.w2 = nn.Parameter(
            torch.randn(hidden, seq_len * (vocab + 1), generator=g, dtype=torch.float64)
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object) -> Out:
        x = self.emb[input_ids].flatten(1)
        h = torch.tanh(x @ self.w1)
        logits = (h @ self.w2).reshape(-1, self.seq_len, self.vocab + 1)
        mask_col = torch.zeros(self.vocab + 1, dtype=logits.dtype)
        mask_col[self.vocab] = -math.inf
        return Out(logits + mask_col, (h[:, None, :].expand(-1, self.seq_len, -1),))


class JointModel(nn.Module):
    """A consistent model: every conditional is a marginal conditional of one joint p(y) over V^L."""

    def __init__(self, vocab: int, length: int, prompt_len: int, *, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.length, self.prompt_len = vocab, length, prompt_len
        self.seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
        self.p = torch.softmax(
            1.5 * torch.randn(len(self.seqs), generator=g, dtype=torch.float64), 0
        )

    def log_joint(self, y: Tensor) -> float:
        idx = int((self.seqs == y).all(-1).nonzero()[0, 0])
        return float(self.p[idx].log())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object) -> Out:
        z = input_ids[:, self.prompt_len :]
        compat = ((z[:, None, :] == self.seqs[None]) | (z[:, None, :] == self.vocab)).all(-1)
        weight = compat.double() * self.p[None]  # [N, S]
        onehot = torch.nn.functional.one_hot(self.seqs, self.vocab).double()  # [S, L, V]
        marg = torch.einsum("ns,slv->nlv", weight, onehot)
        logits = torch.cat([marg.log(), torch.full_like(marg[..., :1], -math.inf)], -1)
        prompt = torch.zeros(len(z), self.prompt_len, self.vocab + 1, dtype=logits.dtype)
        return Out(torch.cat([prompt, logits], 1))


@dataclass
class Table:
    """``logp[s, i] = log pi(y_i | z_s)`` for every subset ``s`` (bitmask of masked positions)."""

    logp: Tensor  # [2^L, L]
    length: int

    def subsets(self, size: int) -> list[int]:
        return [s for s in range(1 << self.length) if bin(s).count("1") == size]


def subset_table(model: nn.Module, prompt: Tensor, y: Tensor, mask_id: int) -> Table:
    """One forward over all ``2^L`` masked versions of ``y``."""
    length = y.shape[0]
    bits = torch.tensor([[(s >> i) & 1 for i in range(length)] for s in range(1 << length)]).bool()
    comp = torch.where(bits, torch.full_like(y, mask_id)[None], y[None])
    inputs = torch.cat([prompt[None].expand(len(bits), -1), comp], 1)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits[:, prompt.shape[0] :].double()
    logp = torch.log_softmax(logits, -1).gather(-1, y[None, :, None].expand(len(bits), -1, 1))
    return Table(logp.squeeze(-1), length)


def exact_elbo(t: Table) -> float:
    """``E_{l~U{1..L}} E_{|M|=l} (L/l) sum_{i in M} log pi(y_i | z_M)`` (equal to the 1/t integral)."""
    big_l = t.length
    total = 0.0
    for size in range(1, big_l + 1):
        subs = t.subsets(size)
        for s in subs:
            idx = [i for i in range(big_l) if (s >> i) & 1]
            total += (big_l / size) * float(t.logp[s, idx].sum()) / len(subs) / big_l
    return total


def elbo_second_moment(t: Table) -> float:
    """``E[X^2]`` of one count-variant draw ``X = (L/l) sum_{i in M} log pi``."""
    big_l = t.length
    total = 0.0
    for size in range(1, big_l + 1):
        subs = t.subsets(size)
        for s in subs:
            idx = [i for i in range(big_l) if (s >> i) & 1]
            total += ((big_l / size) * float(t.logp[s, idx].sum())) ** 2 / len(subs) / big_l
    return total


def eubo_inner(t: Table, gamma: float, power: float = 1.0) -> Tensor:
    """[L]: ``a_i = E[(w 1[i in M] pi_i^gamma)^power]`` over the count variant."""
    big_l = t.length
    out = torch.zeros(big_l, dtype=torch.float64)
    for size in range(1, big_l + 1):
        subs = t.subsets(size)
        for s in subs:
            for i in range(big_l):
                if (s >> i) & 1:
                    val = (big_l / size) * math.exp(gamma * float(t.logp[s, i]))
                    out[i] += val**power / len(subs) / big_l
    return out


def exact_eubo(t: Table, gamma: float) -> float:
    """``sum_i (1/gamma) log E[w 1[i in M] pi(y_i | z)^gamma]`` (DESIGN §4.1)."""
    return float(eubo_inner(t, gamma).log().sum() / gamma)


def eubo_delta_sd(t: Table, gamma: float) -> tuple[float, float]:
    """Per-draw sd of the linearised EUBO ``Y = sum_i X_i / (gamma a_i)`` and its bias scale.

    The estimator from ``n`` draws has sd ``~ sd(Y)/sqrt(n)`` and bias ``<= bias/n``.
    """
    big_l = t.length
    a = eubo_inner(t, gamma)
    mean_y = big_l / gamma
    second = 0.0
    bias = 0.0
    for size in range(1, big_l + 1):
        subs = t.subsets(size)
        for s in subs:
            y = 0.0
            for i in range(big_l):
                if (s >> i) & 1:
                    x = (big_l / size) * math.exp(gamma * float(t.logp[s, i]))
                    y += x / (gamma * float(a[i]))
                    bias += (x / float(a[i])) ** 2 / (2 * gamma) / len(subs) / big_l
            second += y * y / len(subs) / big_l
    return math.sqrt(max(second - mean_y**2, 0.0)), bias


def exact_log_pmix(t: Table) -> float:
    """``log mean_orders prod_k pi(y_{s_k} | revealed)``: all ``L!`` orders enumerated."""
    big_l = t.length
    probs = []
    for order in itertools.permutations(range(big_l)):
        masked = (1 << big_l) - 1
        logp = 0.0
        for i in order:
            logp += float(t.logp[masked, i])
            masked &= ~(1 << i)
        probs.append(logp)
    return float(torch.logsumexp(torch.tensor(probs, dtype=torch.float64), 0)) - math.log(
        len(probs)
    )


def group_batch(model: nn.Module, mask_id: int, *, seeds: bool = True):
    """Six rows in two groups of three (rewards 1 0 0 / 1 1 0) of random 4-token prompts and
    6-token completions, scored by ``model`` against a frozen copy of it as reference, with
    per-row mask seeds (``seeds``) and a seeded generator: the policy-gradient loss tests' batch."""
    import copy

    from embr_rl.core.losses import LossBatch, LossModels

    g = torch.Generator().manual_seed(0)
    b, p, length = 6, 4, 6
    prompt = torch.randint(2, 30, (b, p), generator=g)
    prompt[1] = prompt[2] = prompt[0]
    prompt[4] = prompt[5] = prompt[3]
    return LossBatch(
        prompt_ids=prompt,
        completion_ids=torch.randint(2, 30, (b, length), generator=g),
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
        group_ids=torch.tensor([3, 3, 3, 5, 5, 5]),
        models=LossModels(
            policy=model,
            reference=copy.deepcopy(model).requires_grad_(False),
            mask_id=mask_id,
            generator=torch.Generator().manual_seed(1),
        ),
        mask_seeds=torch.arange(6) * 977 + 5 if seeds else None,
    )
