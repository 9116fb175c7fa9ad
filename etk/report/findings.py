"""Shared judgements on 95% intervals (never on point estimates alone) and the phrases every report section uses.
Each method's own findings live in its `report.py`; the study's one-sentence answer in `etk.study.report`.

An interval is anything with `accuracy` (or another value), `ci_low` and `ci_high`: an `AccuracyCI` record or a
typed result (`EvalResult`, `FaithfulnessResult`, ...)."""

from __future__ import annotations

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


def share_text(v: Doc) -> str:
    sh = v.get("share_of_gap") or {}
    if sh.get("share") is None:
        return "n/a"
    return f"{sh['share']:.0%} [{sh['ci_low']:.0%}, {sh['ci_high']:.0%}]"


def explains(res: Any) -> str | None:
    """'circuit explains F [lo, hi]; three-position ceiling C' for a faithfulness result."""
    if res is None or res.faithfulness is None:
        return None
    c = (res.ceiling or {}).get("faithfulness")
    return (f"circuit explains {res.faithfulness:.2f} [{fmt(res.ci_low, 2)}, {fmt(res.ci_high, 2)}]"
            + (f"; three-position ceiling {c:.2f}" if c is not None else ""))
