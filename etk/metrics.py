"""Metrics: per-example correctness kept (so any interval can be computed), accuracy with a 95% interval."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for tables and messages; `n/a` for an undefined (None or NaN) value."""
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ratio(num: torch.Tensor, den: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of mean(num)/mean(den): example indices resampled jointly for both."""
    g = torch.Generator().manual_seed(seed)
    n = num.shape[0]
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    r = num.double()[idx].mean(1) / den.double()[idx].mean(1).clamp_min(1e-12)
    lo, hi = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def share_of_gap(patched: torch.Tensor, target: torch.Tensor, source: torch.Tensor, n_boot: int = 2000,
                 seed: int = 0) -> dict[str, float | None]:
    """How far patching moves the target model's accuracy toward the source model's, as a share of their gap:
    (acc(patched) - acc(target)) / (acc(source) - acc(target)), with a paired bootstrap 95% interval (the same
    resampled prompts for all three). Per-prompt correctness [N] on the SAME prompts. None when the gap is 0."""
    if not (patched.shape == target.shape == source.shape):
        raise ValueError("share of gap needs the three correctness vectors on the same prompts")
    p, t, s = (x.double() for x in (patched, target, source))
    gap = float(s.mean() - t.mean())
    if gap == 0:
        return {"share": None, "ci_low": None, "ci_high": None, "gap": 0.0,
                "reason": "the two models are equally accurate on these prompts: there is no gap to share"}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, p.shape[0], (n_boot, p.shape[0]), generator=g)
    num, den = p[idx].mean(1) - t[idx].mean(1), s[idx].mean(1) - t[idx].mean(1)
    r = (num / den)[den != 0]
    lo, hi = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"share": float(p.mean() - t.mean()) / gap, "ci_low": lo, "ci_high": hi, "gap": gap}


class TaskAccuracy(Metric):
    """Top-1 accuracy of the answer token; keeps per-example correctness (states are concatenated)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:  # logits [B, V], target [B]
        self.correct.append((logits.argmax(-1) == target).to(torch.float32))

    def per_example(self) -> torch.Tensor:
        return dim_zero_cat(self.correct) if self.correct else torch.zeros(0)

    def compute(self) -> dict[str, float]:
        c = self.per_example()
        n, k = int(c.numel()), int(c.sum().item())
        lo, hi = wilson_interval(k, n)
        return {"accuracy": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi, "n": n}
