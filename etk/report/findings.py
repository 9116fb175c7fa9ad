"""The study's reading: shared judgements on 95% intervals (never on point estimates alone), and the one-sentence
answer to the paper's question. Each method's own findings live in its `report.py`."""

from __future__ import annotations

from typing import Any

from etk.circuits import GROUPS, SHORT
from etk.metrics import fmt
from etk.report.tables import with_ci

Doc = dict[str, Any]

DES_SHORT = {"object_value": "object value", "positional": "position", "box_label_value": "box-label value"}


def above(a: Doc, b: Doc) -> bool:
    """True when a's 95% interval lies wholly above b's (`ci_low`/`ci_high` of each; an undefined bound: False)."""
    return a.get("ci_low") is not None and b.get("ci_high") is not None and a["ci_low"] > b["ci_high"]


def differ(a: Doc, b: Doc) -> bool:
    """True when two accuracies' 95% intervals do not overlap."""
    return above(a, b) or above(b, a)


def share_text(v: Doc) -> str:
    sh = v.get("share_of_gap") or {}
    if sh.get("share") is None:
        return "n/a"
    return f"{sh['share']:.0%} [{sh['ci_low']:.0%}, {sh['ci_high']:.0%}]"


def explains(doc: Doc | None) -> str | None:
    """'circuit explains F [lo, hi]; three-position ceiling C' for a faithfulness document."""
    if not doc or doc.get("faithfulness") is None:
        return None
    c = (doc.get("ceiling") or {}).get("faithfulness")
    return (f"circuit explains {doc['faithfulness']:.2f} [{fmt(doc['ci_low'], 2)}, {fmt(doc['ci_high'], 2)}]"
            + (f"; three-position ceiling {c:.2f}" if c is not None else ""))


def answer_finding(acc: dict[str, Doc], cm: list[Doc], base: str, ft: str, qualifier: str | None) -> str | None:
    """The paper's question in one sentence: how much of the fine-tuning gain the circuit's heads carry, and which
    group carries most of it — or that the gain is not in the heads."""
    fwd = next((d for d in cm if d["direction"] == "forward"), None)
    if base not in acc or ft not in acc or fwd is None:
        return None
    a, b = acc[base], acc[ft]
    if not differ(a, b):
        return (f"**Answer.** Fine-tuning does not change tracking significantly ({with_ci(a)} → {with_ci(b)}), so there "
                "is no gain to locate.")
    r = fwd["results"]
    allg = (r.get("all") or {}).get("share_of_gap") or {}
    per = {g: r[g]["share_of_gap"] for g in GROUPS if g in r and (r[g].get("share_of_gap") or {}).get("share") is not None}
    if allg.get("share") is None or not per:
        return None
    top = max(per, key=lambda g: per[g]["share"])
    share = f"{allg['share']:.0%} [{allg['ci_low']:.0%}, {allg['ci_high']:.0%}]"
    gain = f"{b['accuracy'] - a['accuracy']:+.2f} ({a['accuracy']:.2f} → {b['accuracy']:.2f})"
    if allg["ci_high"] < 0.5:
        body = (f"patching the fine-tuned circuit's heads into the base model recovers only {share} of it: the gain is "
                "mostly not in these heads' outputs (other heads, other positions or the MLPs)")
    else:
        body = (f"patching the fine-tuned circuit's heads into the base model recovers {share} of it, most of it "
                f"through the {SHORT[top]} heads ({per[top]['share']:.0%} [{per[top]['ci_low']:.0%}, "
                f"{per[top]['ci_high']:.0%}] alone)")
    return f"**Answer.** Fine-tuning raises 7-box accuracy by {gain}; {body}" + (f" ({qualifier})." if qualifier else ".")

