"""Mask parametrisations for DCM: one scalar per component, m = weight of the base activation
(m = 1 keeps the base value, m = 0 patches the source in). A component is *selected* when its binarised m is 0."""

from __future__ import annotations

import torch
from torch import nn

from etk.errors import ConfigError


class ClampMask(nn.Module):
    """The paper's: raw values initialised to 1, projected to [0, 1] before every step; selected iff round(m) = 0
    (torch.round sends 0.5 to 0)."""

    def __init__(self, n: int):
        super().__init__()
        self.values = nn.Parameter(torch.ones(n))

    def forward(self) -> torch.Tensor:
        return self.values

    def project_(self) -> None:
        with torch.no_grad():
            self.values.clamp_(0, 1)

    def selected(self) -> torch.Tensor:
        return torch.round(self.values.detach().clamp(0, 1)) == 0


class SigmoidMask(nn.Module):
    """m = sigmoid(logit / temperature), logits initialised so that m starts near 1; selected iff m <= 0.5."""

    def __init__(self, n: int, init: float = 3.0, temperature: float = 1.0):
        super().__init__()
        self.logits = nn.Parameter(torch.full((n,), init))
        self.temperature = temperature

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits / self.temperature)

    def project_(self) -> None:
        pass

    def selected(self) -> torch.Tensor:
        return self.forward().detach() <= 0.5


class HardConcreteMask(nn.Module):
    """L0-style stochastic gates (Louizos et al.; gamma=-0.1, zeta=1.1, beta=2/3 as in subnetwork probing):
    sampled in training, deterministic at evaluation; selected iff the deterministic gate <= 0.5."""

    def __init__(self, n: int, init: float = 3.0, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((n,), init))
        self.beta, self.gamma, self.zeta = beta, gamma, zeta

    def forward(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def project_(self) -> None:
        pass

    def selected(self) -> torch.Tensor:
        s = torch.sigmoid(self.log_alpha.detach())
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1) <= 0.5


MASKS = {"clamp": ClampMask, "sigmoid": SigmoidMask, "hard_concrete": HardConcreteMask}


def make_mask(kind: str, n: int) -> nn.Module:
    if kind not in MASKS:
        raise ConfigError(f"unknown mask parametrisation {kind!r}; choose from {sorted(MASKS)}")
    return MASKS[kind](n)
