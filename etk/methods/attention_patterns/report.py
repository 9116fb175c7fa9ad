"""Report section of `attention_patterns` (the paper's Fig. 1): where each member's circuit groups look from their
role — the share of attention on each of the task's scalar roles and the most-attended token role, with intervals."""

from __future__ import annotations

from etk.metrics import fmt
from etk.report.context import ReportContext, Section
from etk.report.tables import markdown


def top_token_role(d: dict) -> tuple[str, dict] | None:
    """The token role with the largest mean share of a group's attention."""
    shares = {r: v for r, v in (d.get("by_token_role") or {}).items() if v.get("mean") is not None}
    return max(shares.items(), key=lambda rv: rv[1]["mean"]) if shares else None


def share(v: dict) -> str:
    return f"{fmt(v['mean'], 2)} [{fmt(v['ci_low'], 2)}, {fmt(v['ci_high'], 2)}]"


def section(ctx: ReportContext) -> Section | None:
    runs = ctx.results("attention_patterns")
    if not runs:
        return None
    task = ctx.task
    keys = runs[0][1].key_roles
    rows, findings, figures = [], [], []
    for j, r in runs:
        parts = []
        for g, d in r.groups.items():
            top = top_token_role(d)
            rows.append([j.member or "", task.short.get(g, g), f"`{d['role']}`", str(len(d["heads"]))]
                        + [fmt(d["group"][k]["mean"], 2) for k in keys] + [f"{top[0]} {share(top[1])}" if top else "n/a"])
            if top:
                parts.append(f"{task.short.get(g, g)} from `{d['role']}` → {top[0]} {share(top[1])}")
        figures += [f"![{j.member} {p.stem}]({ctx.rel(p)})" for p in r.figure_paths()]
        if parts:
            findings.append(f"**Attention patterns ({j.member}).** Each group's most-attended token role (mean share "
                            "over its heads and prompts): " + "; ".join(parts) + ".")
    lines = [f"Mean attention probability of each group's heads from its role to the task's roles, averaged over "
             f"{runs[0][1].n} prompts; the last column is the token role with the largest share (95% interval).", "",
             markdown(["member", "group", "from", "heads", *keys, "most attended"], rows), "", *figures]
    return Section("Attention patterns", lines, findings)
