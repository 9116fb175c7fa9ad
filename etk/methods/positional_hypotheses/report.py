"""Report section of `positional_hypotheses`: which positional information each positional head set follows."""

from __future__ import annotations

from etk.report.context import ReportContext, Section
from etk.report.findings import above
from etk.report.tables import markdown, with_ci
from etk.results import PositionalHypothesesResult

WORDS = {"ordinal_start": "ordinal from the first box", "ordinal_end": "ordinal from the last box",
         "offset_start": "token offset from the start", "offset_end": "token offset from the end"}


def head_to_head(d: PositionalHypothesesResult, a: str, b: str) -> tuple[dict, dict, int] | None:
    """The selected heads' rates for a and b over the pairs where the two name different objects."""
    pw = (d.pairwise or {}).get(f"{a}|{b}") or {}
    if pw:
        return pw[a]["selected"], pw[b]["selected"], pw["n"]
    pw = (d.pairwise or {}).get(f"{b}|{a}") or {}
    return (pw[a]["selected"], pw[b]["selected"], pw["n"]) if pw else None


def verdict(d: PositionalHypothesesResult, short: str) -> str:
    """The hypothesis the heads follow, each other hypothesis compared with it head to head (over the pairs where
    the two name different objects) and judged on 95% intervals."""
    sel = {h: v["selected"] for h, v in d.pooled.items() if v["selected"]["accuracy"] is not None}
    if not sel:
        return f"**Which position ({short}).** No pair tells the hypotheses apart."
    ranked = sorted(sel, key=lambda h: -sel[h]["accuracy"])
    best, ties, below, said_pairs = ranked[0], [], [], []
    for h in ranked[1:]:
        hh = head_to_head(d, best, h)
        if hh is None or not hh[2]:
            continue
        a, b, n = hh
        said_pairs.append(f"vs {WORDS.get(h, h)}: {with_ci(a)} against {with_ci(b)} on {n} pairs")
        (below if above(a, b) else ties).append(h)
    if not ties:
        said = f"the heads follow the {WORDS.get(best, best)}"
    else:
        said = (f"the {WORDS.get(best, best)} leads but is not distinguishable from the "
                + ", ".join(WORDS.get(h, h) for h in ties) + " at this sample size")
    if below:
        said += "; ruled out: " + ", ".join(WORDS.get(h, h) for h in below)
    return (f"**Which position ({short}, `{d.model}`).** Head to head with the {WORDS.get(best, best)} (the share "
            f"answered with each one's object where the two differ): " + "; ".join(said_pairs) + f" — {said}.")


def section(ctx: ReportContext) -> Section | None:
    runs = ctx.of("positional_hypotheses")
    if not runs:
        return None
    short = ctx.task.short
    lines = ["Each positional head set patched from the sources of each probe (the paper's positional variants; "
             "sources with other box counts), every answer scored against each hypothesis: the share answered with "
             "that hypothesis's object, over the pairs where that object is not the base's own answer (95% Wilson "
             "interval; a random head set of the same size beside it).", ""]
    findings = []
    for d in runs:
        hyps = d.hypotheses
        rows = [[probe, str(p["disagreeing_pairs"]), *(f"{with_ci(p['hypotheses'][h]['selected'])}" for h in hyps)]
                for probe, p in d.probes.items()]
        rows.append(["**pooled, disagreeing pairs**", str(d.n_pooled), *(with_ci(d.pooled[h]["selected"]) for h in hyps)])
        rows.append(["random heads, pooled", str(d.n_pooled), *(with_ci(d.pooled[h]["random"]) for h in hyps)])
        lines += [f"**{short.get(d.group, d.group)}** ({len(d.heads)} heads, `{d.model}`):", "",
                  markdown(["probe", "pairs that disagree", *(WORDS.get(h, h) for h in hyps)], rows), ""]
        findings.append(verdict(d, short.get(d.group, d.group)))
    return Section("What positional information the heads carry", lines, findings)
