"""Shared judgements on 95% intervals (never on point estimates alone) and the phrases every report section uses.
Each method's own findings live in its `report.py`; the study's one-sentence answer in `etk.study.report`.

An interval is anything with `accuracy` (or another value), `ci_low` and `ci_high`: an `AccuracyCI` record or a
typed result (`EvalResult`, `FaithfulnessResult`, ...)."""

from __future__ import annotations

import math
from typing import Any

from etk.metrics import fmt
from etk.report.tables import value

Doc = dict[str, Any]



def above(a: Any, b: Any) -> bool:
    """True when a's 95% interval lies wholly above b's (`ci_low`/`ci_high` of each; an undefined bound: False)."""
    lo, hi = value(a, "ci_low"), value(b, "ci_high")
    return lo is not None and hi is not None and lo > hi


def differ(a: Any, b: Any) -> bool:
    """True when two accuracies' 95% intervals do not overlap."""
    return above(a, b) or above(b, a)


MATTERS = 0.05  # an accuracy change smaller than this (absolute) is taken not to matter


def no_difference_text(a: Any, b: Any, matters: float = MATTERS) -> str:
    """What two accuracies whose 95% intervals overlap allow one to say: "unchanged" only when the 95% interval of
    their difference lies within ±`matters`; else "not distinguishable at this sample size" with the smallest change
    the two samples could detect (80% power, two-sided 5%: 2.80 standard errors of the difference)."""
    p1, n1, p2, n2 = value(a, "accuracy"), value(a, "n"), value(b, "accuracy"), value(b, "n")
    if p1 is None or p2 is None:
        return "not distinguishable (an accuracy is undefined)"
    if not n1 or not n2:
        return "not distinguishable (the intervals overlap; their sample sizes are not recorded)"
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    if abs(p1 - p2) + 1.959964 * se < matters:
        return f"unchanged (a change of {matters:.2f} or more is ruled out)"
    return (f"not distinguishable at this sample size (n = {n1} / {n2}; the smallest change these samples could "
            f"detect is about {2.80 * se:.2f})")


def share_text(v: Doc) -> str:
    sh = v.get("share_of_gap") or {}
    if sh.get("share") is None:
        return "n/a"
    return f"{sh['share']:.0%} [{sh['ci_low']:.0%}, {sh['ci_high']:.0%}]"


def explains(res: Any) -> str | None:
    """'circuit explains F [lo, hi]; every head at its positions C' for a faithfulness result."""
    if res is None or res.faithfulness is None:
        return None
    c = (res.all_heads or {}).get("faithfulness")
    return (f"circuit explains {res.faithfulness:.2f} [{fmt(res.ci_low, 2)}, {fmt(res.ci_high, 2)}]"
            + (f"; every head at its positions {c:.2f}" if c is not None else ""))
