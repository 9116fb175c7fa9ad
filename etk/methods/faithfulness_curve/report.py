"""Report section of `faithfulness_curve` (with `faithfulness`): how much of each model its circuits explain — the
the all-heads reference, the paper circuit, the top-x% curves on one plot."""

from __future__ import annotations

from etk.data.roles import MEMBERS
from etk.metrics import fmt
from etk.report.context import ReportContext, Section
from etk.report.plots import curve_plot
from etk.report.tables import markdown, with_ci


def section(ctx: ReportContext) -> Section | None:
    """How much of each model its circuits explain: the all-heads reference, the paper circuit, the curves on one plot."""
    by_member = {j.member: r for j, r in ctx.results("faithfulness_curve")}
    curves = {r.model: {"points": r.points, "all_heads": r.all_heads} for r in by_member.values()}
    if not curves:
        return None
    lines = [f"Mean ablation as in SPEC §3.1. *Ceiling*: every head kept at {ctx.task.vital_phrase} and every other "
             "position mean-ablated: about the most a circuit of the "
             "paper's form can explain (a subset can do a little better by dropping heads that hurt under ablation). "
             "*Paper circuit*: the model's own pruned circuit. *Curve*: each group's top-x% heads (CPR = area under the "
             "curve, CMD = area between it and 1, MIB's measures).", ""]
    rows, findings = [], []
    for member, name in zip(MEMBERS, (ctx.base, ctx.ft)):
        own, cv = ctx.result("faithfulness", circuit_of=member, member=member), by_member.get(member)
        ref = own or cv
        reference = (ref.all_heads or {}).get("faithfulness") if ref is not None else None
        rows.append([f"`{name}`", fmt(ref.accuracy_model if ref is not None else None), fmt(reference, 2),
                     with_ci(own, "faithfulness") if own else "", fmt(own.relative_to_all_heads, 2) if own else "",
                     f"{fmt(cv.cpr, 2)} / {fmt(cv.cmd, 2)}" if cv else ""])
        parts = []
        if own and own.faithfulness is not None:
            c = own.all_heads["faithfulness"]
            parts.append(f"the paper-style circuit ({sum(own.heads_per_role.values())} head-positions) keeps "
                         f"{own.faithfulness:.2f} [{fmt(own.ci_low, 2)}, {fmt(own.ci_high, 2)}] of its accuracy; "
                         f"keeping every head at {ctx.task.vital_phrase.split(' (')[0]} keeps {fmt(c, 2)} (the all-heads reference)"
                         + (", so much of the mechanism runs through other positions" if c is not None and c < 0.6 else ""))
        if cv and cv.cpr is not None:
            best = max(cv.points, key=lambda p: p["faithfulness"] or 0)
            parts.append(f"top-x% circuits reach {fmt(best['faithfulness'], 2)} at {100 * best['fraction']:g}% of the "
                         f"heads (CPR {cv.cpr:.2f}, CMD {cv.cmd:.2f})")
        if parts:
            findings.append(f"**How much the circuits explain, `{name}`.** " + "; ".join(parts) + ".")
    lines += [markdown(["model", "accuracy", "all heads F", "paper circuit F [95% CI]", "of all heads", "curve CPR / CMD"], rows)]
    curve_plot(curves, ctx.root / "curves.png", "faithfulness vs circuit size")
    lines += ["![faithfulness curves](curves.png)", ""]
    return Section("Circuit quality: how much of each model its circuits explain", lines, findings)
