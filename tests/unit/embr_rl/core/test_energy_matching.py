"""Defining property of EMBR on an enumerable toy (DESIGN §4.2, paper eqs. 8, 11-12).

A categorical policy over 12 sequences is fitted with samples from a fixed full-support
``mu`` that is not the policy; both L_EM (free ``c``) and L_CM must reach the Boltzmann
target ``pi_ref * exp(r/beta) / Z``.
"""

from __future__ import annotations

import torch

from embr_rl.core.losses import embr_c_objective, embr_e_objective

S, BETA = 12, 0.5


def _toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    log_ref = torch.log_softmax(torch.randn(S, generator=g, dtype=torch.float64), 0)
    r = torch.randint(0, 3, (S,), generator=g).double()
    mu = torch.softmax(torch.randn(S, generator=g, dtype=torch.float64), 0)
    target = torch.log_softmax(log_ref + r / BETA, 0)
    return log_ref, r, mu, target


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    return float((log_p.exp() * (log_p - log_q)).sum())


def _fit(kind: str) -> float:
    log_ref, r, mu, target = _toy()
    theta = log_ref.clone().requires_grad_(True)  # pi_theta starts at pi_ref
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta, c], lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        idx = torch.multinomial(mu, 64, replacement=True, generator=g)
        log_pi = torch.log_softmax(theta, 0)
        f = log_pi - log_ref - r / BETA
        if kind == "em":
            loss = embr_e_objective(f[idx], c)
        else:
            other = torch.multinomial(mu, 64, replacement=True, generator=g)
            both = torch.cat([idx, other])
            pairs = torch.stack([torch.arange(64), torch.arange(64, 128)], 1)
            loss = embr_c_objective(f[both], pairs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _kl(mu.log(), torch.log_softmax(theta.detach(), 0)) > 0.05  # mu really is not the policy
    return _kl(target, torch.log_softmax(theta.detach(), 0))


def test_energy_matching_reaches_boltzmann_target() -> None:
    log_ref, _, _, target = _toy()
    assert _kl(target, log_ref) > 0.1  # the target is far from the start
    assert _fit("em") < 1e-3


def test_contrastive_matching_reaches_boltzmann_target() -> None:
    assert _fit("cm") < 1e-3


def test_em_gradient_on_policy_is_twice_covariance() -> None:
    """At ``mu = pi_theta`` and optimal ``c``: grad L_EM = 2 Cov(f, grad log pi) (eqs. 11-12)."""
    log_ref, r, _, _ = _toy()
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(S, generator=g, dtype=torch.float64, requires_grad=True)
    log_pi = torch.log_softmax(theta, 0)
    f = log_pi - log_ref - r / BETA
    pi = log_pi.exp().detach()
    c = -(pi * f).sum().detach()  # argmin_c of the exact loss
    loss = (pi * (f + c) ** 2).sum()  # exact expectation under mu = pi_theta (not differentiated)
    (grad,) = torch.autograd.grad(loss, theta)
    fd = f.detach()
    score = torch.eye(S, dtype=torch.float64) - pi[None, :]  # row y: grad_theta log pi(y)
    cov = (pi[:, None] * (fd - (pi * fd).sum())[:, None] * score).sum(0)
    assert torch.allclose(grad, 2 * cov, atol=1e-12, rtol=1e-10)
    assert grad.abs().max() > 1e-3
