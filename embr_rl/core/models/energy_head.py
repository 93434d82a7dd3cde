"""The prompt-dependent offset ``c_phi(x)`` of EMBR-E (DESIGN §4.2, paper eq. 9).

A small MLP on the mean-pooled last hidden states of the prompt positions, computed by the
policy's own forward pass over the prompt alone, so ``c`` is a function of ``x`` only (a
forward that also saw completion tokens would let ``c`` absorb ``f(y)``).
"""

from __future__ import annotations

from torch import Tensor, nn


class EnergyHead(nn.Module):
    """``c_phi(x) = MLP(mean_{prompt positions} h_last)`` -> [B]."""

    def __init__(self, hidden_size: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``hidden_states`` [B, P, H] of the prompt, ``attention_mask`` [B, P] (1 = real token)."""
        if attention_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            w = attention_mask.to(hidden_states.dtype)[..., None]
            pooled = (hidden_states * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.net(pooled.to(self.net[0].weight.dtype)).squeeze(-1)


def prompt_offset(
    model: nn.Module,
    head: EnergyHead,
    prompt_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    detach_features: bool = True,
) -> Tensor:
    """[B] ``c_phi(x)`` from the policy's last hidden states over the prompt positions.

    ``detach_features`` keeps the head's regression from shaping the policy's features, so
    the policy gradient is that of paper eq. 11.
    """
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    if detach_features:
        hidden = hidden.detach()
    return head(hidden, attention_mask)


__all__ = ["EnergyHead", "prompt_offset"]
