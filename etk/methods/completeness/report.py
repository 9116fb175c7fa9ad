"""Report section of `completeness`: incompleteness |F(C\\K) - F(M\\K)| of each member's circuit for random K, each
whole group and (fine-tuned member) its shared and its added heads."""

from __future__ import annotations

from etk.metrics import fmt
from etk.report.context import ReportContext, Section
from etk.report.tables import markdown
from etk.results import CompletenessResult


def completeness_rows(member: str, r: CompletenessResult) -> list[list[str]]:
    rs = r.random or {}
    rows = []
    if rs:
        rows.append([member, f"random K (p = {r.p}, {r.n_random} draws)", "",
                     f"{fmt(rs['F_C_minus_K']['mean'])} ± {fmt(rs['F_C_minus_K']['sd'])}",
                     f"{fmt(rs['F_M_minus_K']['mean'])} ± {fmt(rs['F_M_minus_K']['sd'])}",
                     f"{fmt(rs['incompleteness']['mean'])} ± {fmt(rs['incompleteness']['sd'])}"])
    for k, v in {**r.groups, **r.named}.items():
        rows.append([member, k, str(v["size"]), fmt(v["F_C_minus_K"]), fmt(v["F_M_minus_K"]), fmt(v["incompleteness"])])
    return rows


def section(ctx: ReportContext) -> Section | None:
    runs = ctx.results("completeness")
    if not runs:
        return None
    rows = [row for j, r in runs for row in completeness_rows(j.member or "", r)]
    findings = []
    for j, r in runs:
        rs = (r.random or {}).get("incompleteness")
        worst = max(r.groups.items(), key=lambda kv: kv[1]["incompleteness"], default=None)
        if rs and worst:
            findings.append(f"**Completeness ({j.member}).** Removing a random half of the circuit changes the circuit "
                            f"and the model differently by {fmt(rs['mean'])} ± {fmt(rs['sd'])} (incompleteness; 0 = "
                            f"complete); the largest group gap is {worst[0]} ({fmt(worst[1]['incompleteness'])}).")
    lines = ["F(C\\K): the circuit without K (everything else mean-ablated); F(M\\K): the whole model with only K "
             "ablated; both relative to the unablated model. Incompleteness = |F(C\\K) − F(M\\K)| (SPEC §3.3).", "",
             markdown(["member", "K", "heads", "F(C\\K)", "F(M\\K)", "incompleteness"], rows)]
    return Section("Completeness", lines, findings)
