"""ELBO/EUBO facts of DESIGN §4.1 checked against exact enumeration (all masks, all orders).

Models: an arbitrary tiny network (inconsistent conditionals) and a model whose conditionals
come from one random joint distribution. Monte Carlo tolerances are ``5`` standard errors,
computed from the sample count (and, where finite, the exact per-draw variance).
"""

from __future__ import annotations

import math

import pytest
import torch
from embr_toys import (
    JointModel,
    TinyNet,
    elbo_second_moment,
    eubo_delta_sd,
    exact_elbo,
    exact_eubo,
    exact_log_pmix,
    subset_table,
)

from embr_rl.core.likelihood import bounds

# (vocabulary, completion length, prompt length)
SHAPES = [(4, 4, 2), (3, 5, 1), (5, 3, 2)]
Z = 5.0  # standard errors allowed for a Monte Carlo comparison


def _case(kind: str, vocab: int, length: int, plen: int, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    prompt = torch.randint(0, vocab, (plen,), generator=g)
    y = torch.randint(0, vocab, (length,), generator=g)
    if kind == "net":
        model = TinyNet(vocab, plen + length, seed=seed)
    else:
        model = JointModel(vocab, length, plen, seed=seed)
    return model, prompt, y, subset_table(model, prompt, y, vocab)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_elbo_below_mixture_likelihood(shape: tuple[int, int, int], seed: int) -> None:
    vocab, length, plen = shape
    _, _, _, net = _case("net", vocab, length, plen, seed)
    assert exact_elbo(net) < exact_log_pmix(net) - 1e-6
    joint, _, y, tab = _case("joint", vocab, length, plen, seed)
    log_p = joint.log_joint(y)
    assert exact_log_pmix(tab) == pytest.approx(log_p, abs=1e-9)
    assert exact_elbo(tab) == pytest.approx(log_p, abs=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0, 4.0])
def test_exact_eubo_above_elbo_and_log_p(shape: tuple[int, int, int], gamma: float) -> None:
    vocab, length, plen = shape
    for seed in (0, 1):
        _, _, _, net = _case("net", vocab, length, plen, seed)
        assert exact_eubo(net, gamma) > exact_elbo(net)
        joint, _, y, tab = _case("joint", vocab, length, plen, seed)
        assert exact_eubo(tab, gamma) >= joint.log_joint(y) - 1e-12
        assert exact_eubo(tab, gamma) > exact_elbo(tab)


VARIANTS = [
    (scheme, strat, anti)
    for scheme in ("uniform", "count")
    for strat in (False, True)
    for anti in (False, True)
]


@pytest.mark.parametrize("kind", ["net", "joint"])
@pytest.mark.parametrize(("scheme", "stratified", "antithetic"), VARIANTS)
def test_elbo_estimate_is_unbiased(
    kind: str, scheme: str, stratified: bool, antithetic: bool
) -> None:
    model, prompt, y, tab = _case(kind, 4, 4, 2)
    rows, n = 3000, 4  # 3000 independent estimates of n draws each
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        est = bounds(
            model,
            prompt.expand(rows, -1),
            y.expand(rows, -1),
            mask_id=4,
            num_samples=n,
            generator=gen,
            scheme=scheme,
            stratified=stratified,
            antithetic=antithetic,
        ).elbo
    exact = exact_elbo(tab)
    se = float(est.std()) / math.sqrt(rows)
    assert abs(float(est.mean()) - exact) < Z * se
    if scheme == "count" and not (stratified or antithetic):
        # i.i.d. draws: the estimator's variance is the exact per-draw variance / n
        var = (elbo_second_moment(tab) - exact**2) / n
        centred = est.double() - exact
        se_var = math.sqrt(float((centred**4).mean() - var**2) / rows)
        assert abs(float((centred**2).mean()) - var) < Z * se_var


def _var_and_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    c = x - x.mean()
    var = float((c**2).mean())
    return var, math.sqrt(max(float((c**4).mean()) - var**2, 0.0) / len(x))


@pytest.mark.parametrize(
    ("kind", "stratified", "antithetic"),
    [("joint", True, False), ("joint", False, True), ("net", False, True), ("joint", True, True)],
)
def test_variance_reduction(kind: str, stratified: bool, antithetic: bool) -> None:
    """Count variant (finite variance): stratified/antithetic estimates vary less than i.i.d. ones."""
    model, prompt, y, _ = _case(kind, 4, 4, 2)
    rows, n = 4000, 4
    out = {}
    for key, (s, a) in {"iid": (False, False), "vr": (stratified, antithetic)}.items():
        gen = torch.Generator().manual_seed(21)
        with torch.no_grad():
            out[key] = bounds(
                model,
                prompt.expand(rows, -1),
                y.expand(rows, -1),
                mask_id=4,
                num_samples=n,
                generator=gen,
                scheme="count",
                stratified=s,
                antithetic=a,
            ).elbo
    v0, se0 = _var_and_se(out["iid"])
    v1, se1 = _var_and_se(out["vr"])
    ratio = v1 / v0
    se_ratio = ratio * math.sqrt((se0 / v0) ** 2 + (se1 / v1) ** 2)
    assert ratio + Z * se_ratio < 1.0


@pytest.mark.parametrize("kind", ["net", "joint"])
@pytest.mark.parametrize("gamma", [1.0, 1.5])
def test_eubo_converges_to_exact(kind: str, gamma: float) -> None:
    model, prompt, y, tab = _case(kind, 4, 4, 2)
    n = 20000
    gen = torch.Generator().manual_seed(31)
    with torch.no_grad():
        out = bounds(
            model,
            prompt[None],
            y[None],
            mask_id=4,
            num_samples=n,
            gamma=gamma,
            generator=gen,
            scheme="count",
            stratified=True,
            antithetic=True,
        )
    sd, bias = eubo_delta_sd(tab, gamma)
    # stratified/antithetic draws vary no more than i.i.d. ones here; bias of log-of-mean is O(1/n)
    tol = Z * sd / math.sqrt(n) + bias / n
    assert float(out.coverage) == 1.0
    assert abs(float(out.eubo) - exact_eubo(tab, gamma)) < tol
    assert abs(float(out.elbo) - exact_elbo(tab)) < Z * math.sqrt(
        (elbo_second_moment(tab) - exact_elbo(tab) ** 2) / n
    )


def test_eubo_is_no_bound_for_an_inconsistent_net() -> None:
    """DESIGN §4.1 fact 4: for an arbitrary network the EUBO can fall below ``log p_mix``.

    Over TinyNet seeds 0-19 (V = 4, L = 4) this happens for 5 at gamma = 1, 2 at gamma = 1.5
    and none at gamma = 2; seed 14 shows it for both gamma = 1 and 1.5.
    """
    _, _, _, tab = _case("net", 4, 4, 2, seed=14)
    log_pmix = exact_log_pmix(tab)
    assert exact_eubo(tab, 1.0) < log_pmix - 1.0
    assert exact_eubo(tab, 1.5) < log_pmix - 0.3
    assert exact_eubo(tab, 2.0) > log_pmix


@pytest.mark.parametrize("kind", ["net", "joint"])
def test_gap_eubo_converges_to_exact(kind: str) -> None:
    """``estimator="gap"`` (ELBO plus the self-normalised Jensen gap) is consistent too:
    over 8 independent batches of draws its mean lies within 5 standard errors (plus an
    O(1/n) allowance for the ratio's bias) of the exact EUBO."""
    model, prompt, y, tab = _case(kind, 4, 4, 2)
    gamma, n, batches = 1.5, 4000, 8
    gen = torch.Generator().manual_seed(32)
    values = []
    with torch.no_grad():
        for _ in range(batches):
            out = bounds(
                model, prompt[None], y[None], mask_id=4, num_samples=n, gamma=gamma,
                generator=gen, scheme="count", stratified=True, estimator="gap",
            )  # fmt: skip
            assert float(out.eubo) >= float(out.elbo)
            values.append(float(out.eubo))
    mean = sum(values) / batches
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (batches - 1) / batches)
    assert abs(mean - exact_eubo(tab, gamma)) < Z * se + 50.0 / n
