"""Faithfulness as a function of circuit size: circuits made of each group's top-x% heads by path-patching score,
and the two integrated measures of the MIB circuit-localisation benchmark (Mueller et al. 2025).

At fraction x every group takes its round(x * n_heads) best heads (scored heads by ascending score, then the
heads its stage could not score), of two groups at one role the later's heads are removed from the earlier's (PT's
from VF as in the paper's construction, both at `last`), and each group acts at its role. At x = 1 every head is kept at every vital role: the all-heads reference.

CPR = the area under the faithfulness curve, CMD = the area between the curve and 1 (|1 - F|), both over the
log-spaced fractions rescaled to [0, 1] (trapezoids), so a curve at 1 everywhere has CPR 1 and CMD 0."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from etk.circuits import Circuit, exclusive_at_shared_roles, in_task_order
from etk.errors import ConfigError
from etk.interventions.components import HeadId

DEFAULT_FRACTIONS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def ranked_heads(scores: torch.Tensor, scored: torch.Tensor | None = None) -> list[HeadId]:
    """Every head of a [layer, head] score map, most important (most negative) first; heads outside `scored`
    (unreachable senders) last, in layer-head order."""
    L, H = scores.shape
    ok = torch.ones(L, H, dtype=torch.bool) if scored is None else scored.bool()
    flat = scores.flatten().double()
    idx = list(torch.argsort(torch.where(ok.flatten(), flat, torch.inf), stable=True).tolist())
    return [HeadId(i // H, i % H) for i in idx]


def curve_circuits(scores: dict[str, torch.Tensor], scored: dict[str, torch.Tensor] | None,
                   fractions: Sequence[float]) -> list[tuple[float, Circuit]]:
    """(fraction, circuit) for each fraction, from the groups' score maps."""
    ranks = {g: ranked_heads(scores[g], None if scored is None else scored.get(g)) for g in in_task_order(scores)}
    n = next(iter(scores.values())).numel()
    out = []
    for x in fractions:
        if not 0 < x <= 1:
            raise ConfigError(f"curve fractions must lie in (0, 1], got {x}")
        k = max(1, round(x * n))
        groups = exclusive_at_shared_roles({g: r[:k] for g, r in ranks.items()})
        out.append((float(x), Circuit(groups, {"fraction": float(x)})))
    return out


def integrated(fractions: Sequence[float], faithfulness: Sequence[float]) -> dict[str, float]:
    """CPR (area under the curve) and CMD (area between the curve and 1) over log-spaced fractions in [0, 1]."""
    if len(fractions) < 2:
        raise ConfigError("a faithfulness curve needs at least two points")
    xs = [math.log(f) for f in fractions]
    span = xs[-1] - xs[0]
    if span <= 0:
        raise ConfigError("curve fractions must be increasing")
    t = [(x - xs[0]) / span for x in xs]
    trap = lambda ys: sum((t[i + 1] - t[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(t) - 1))  # noqa: E731
    return {"cpr": trap(list(faithfulness)), "cmd": trap([abs(1 - f) for f in faithfulness])}


def curve_points(fractions: Sequence[float], circuits: Sequence[Circuit], docs: Sequence[dict[str, Any]]) -> list[dict]:
    """The curve.json points from each circuit's faithfulness document."""
    return [{"fraction": x, "n_heads": len(c.units()), "heads_per_role": d["heads_per_role"],
             "accuracy": d["accuracy_circuit"], "faithfulness": d["faithfulness"], "ci_low": d["ci_low"],
             "ci_high": d["ci_high"]} for x, c, d in zip(fractions, circuits, docs)]
