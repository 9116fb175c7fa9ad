"""Report section of `dcm`: what each group's heads encode, judged against the unpatched floor."""

from __future__ import annotations

from typing import Any

from etk.circuits import GROUPS, SHORT
from etk.report.context import ReportContext, Section
from etk.report.findings import DES_SHORT, Doc
from etk.report.tables import markdown, with_ci


def dcm_table(docs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """SPEC §4.4's table: heads selected / group size and test accuracy, per model x group x desideratum."""
    header = ["model", "group", "desideratum", "selected / group", "test accuracy [95% CI]", "unpatched floor"]
    rows = []
    order = {g: i for i, g in enumerate(GROUPS)}  # circuit order VF, PT, PD, SR; unknown groups last
    for d in sorted(docs, key=lambda d: (d["model"], order.get(d["group"], len(order)), d["group"], d["desideratum"])):
        t, f = d["test"], d["chance_floor_unpatched"]
        pct = 100 * d["n_selected"] / max(1, d["group_size"])
        rows.append([d["model"], d["group"], d["desideratum"], f"{d['n_selected']}/{d['group_size']} ({pct:.0f}%)",
                     with_ci(t), f"{f['accuracy']:.3f}"])
    return header, rows


def dcm_findings(dc: list[Doc]) -> list[str]:
    """Per group: the desiderata whose selected heads beat the unpatched floor (test interval above it)."""
    out = []
    for g in GROUPS:
        runs = [d for d in dc if d["group"] == g]
        if not runs:
            continue
        wins = [d for d in runs if d["n_selected"] and d["test"]["ci_low"] > d["chance_floor_unpatched"]["accuracy"]]
        if wins:
            parts = [f"{DES_SHORT.get(d['desideratum'], d['desideratum'])} ({d['n_selected']}/{d['group_size']} heads, "
                     f"{d['test']['accuracy']:.2f} vs floor {d['chance_floor_unpatched']['accuracy']:.2f})"
                     for d in sorted(wins, key=lambda d: -d["test"]["accuracy"])]
            out.append(f"**DCM, {SHORT[g]}.** Heads encode " + "; ".join(parts) + ".")
        else:
            out.append(f"**DCM, {SHORT[g]}.** No desideratum tested is encoded above its floor by a selected head set.")
    return out


def section(ctx: ReportContext) -> Section | None:
    dc = ctx.docs("dcm")
    if not dc:
        return None
    q = ctx.qualifier()
    return Section("DCM: what each group's heads encode",
                   ["Heads selected (mask rounded to 0) / group size; test accuracy of patching them; the unpatched "
                    "model's accuracy on the same targets is the chance floor.", "", markdown(*dcm_table(dc))],
                   [f"{x} ({q})" if q else x for x in dcm_findings(dc)])
