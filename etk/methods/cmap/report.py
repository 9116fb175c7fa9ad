"""Report section of `cmap`: the patched accuracies, and where the fine-tuning gain comes from (the share of the gap
each group's heads carry, with paired-bootstrap intervals)."""

from __future__ import annotations

from etk.report.context import ReportContext, Section
from etk.report.findings import differ, no_difference_text, share_text
from etk.results import CMAPResult
from etk.tasks import task_of


def cmap_findings(cm: list[CMAPResult], qualifier: str | None = None) -> list[str]:
    """Forward CMAP: the share of the fine-tuned model's gain that each group's heads carry into the base model (with
    paired-bootstrap intervals); reverse: how much of the gain the base model's heads take away."""
    out = []
    tail = f" ({qualifier})" if qualifier else ""
    for d in cm:
        r, task = d.results, task_of(d.config)
        SHORT = task.short
        src, tgt = r["source_alone"], r["target_alone"]
        groups = {g: r[g] for g in [*task.group_names, "all"] if g in r}
        if not groups:
            continue
        if d.direction == "forward":
            if not differ(src, tgt):
                moved = [SHORT.get(g, g) for g, v in groups.items() if differ(v, tgt)]
                same = no_difference_text(src, tgt)
                if not same.startswith("unchanged"):  # the models' accuracies overlap, but a gain is not ruled out
                    out.append(f"**CMAP.** `{d.source_model}` ({src['accuracy']:.3f}) and `{d.target_model}` "
                               f"({tgt['accuracy']:.3f}) on CMAP's prompts: {same}, so no share of a gain can be "
                               "located there" + (f"; patching changes accuracy significantly for {', '.join(moved)}"
                                                  if moved else "") + ".")
                    continue
                out.append(f"**CMAP.** `{d.source_model}` and `{d.target_model}` are equally accurate "
                           f"({src['accuracy']:.3f} vs {tgt['accuracy']:.3f}): there is no gain to locate. Patching the "
                           "fine-tuned heads into the base model " + (f"changes accuracy significantly for {', '.join(moved)}"
                           if moved else "leaves accuracy unchanged for every group: the two models' head outputs are "
                           "interchangeable (compatible representations)") + ".")
                continue
            per = {g: v for g, v in groups.items() if g != "all" and (v.get("share_of_gap") or {}).get("share") is not None}
            order = sorted(per, key=lambda g: -per[g]["share_of_gap"]["share"])
            parts = ", ".join(f"{SHORT[g]} {share_text(per[g])}" for g in order)
            allg = groups.get("all", {}).get("share_of_gap") or {}
            if allg.get("share") is None:
                verdict = ""
            elif allg["ci_high"] < 0.5:
                verdict = (f" All circuit heads together recover only {share_text(groups['all'])}: most of the gain is not in "
                           "these heads' outputs (it lies in other heads, other positions or the MLPs).")
            elif allg["ci_low"] <= 0:
                verdict = f" All circuit heads together recover {share_text(groups['all'])}: no measurable share of the gain."
            else:
                top = order[0] if order else None
                verdict = (f" All circuit heads together recover {share_text(groups['all'])} of the gain"
                           + (f"; the {SHORT[top]} heads carry the largest share ({share_text(per[top])})" if top else "") + ".")
            out.append(f"**Where the gain comes from (CMAP).** Fine-tuning moves accuracy {tgt['accuracy']:.3f} → "
                       f"{src['accuracy']:.3f}; patching the fine-tuned model's heads into the base model recovers, per "
                       f"group: {parts}.{verdict}{tail}")
        else:
            drops = {g: v for g, v in groups.items() if differ(v, tgt)}
            shares = ", ".join(f"{SHORT.get(g, g)} {v['accuracy']:.3f} ({share_text(v)} of the way to `{d.source_model}`)"
                               for g, v in drops.items())
            out.append(f"**Reverse CMAP.** Giving `{d.target_model}` ({tgt['accuracy']:.3f}) the base model's head "
                       f"outputs: " + (shares if drops else "no group changes it significantly") + ".")
    return out


def section(ctx: ReportContext) -> Section | None:
    cm = ctx.of("cmap", part=None)
    if not cm:
        return None
    lines = []
    for d in cm:
        lines += [f"**{d.direction}**: heads of the fine-tuned circuit patched from `{d.source_model}` into "
                  f"`{d.target_model}`.", "", (d.dir / "cmap_table.md").read_text()]
    return Section("Cross-model activation patching", lines, cmap_findings(cm, ctx.qualifier()))
