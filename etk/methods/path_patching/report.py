"""Report section of `path_patching` (with `minimality`'s pruning): the candidates, the pruned circuits, their
heatmaps and their overlap between the two members."""

from __future__ import annotations

from etk.circuits import load_circuit, overlap
from etk.data.roles import MEMBERS
from etk.metrics import fmt
from etk.report.context import ReportContext, Section
from etk.report.tables import markdown


def section(ctx: ReportContext) -> Section | None:
    pp = ctx.results("path_patching")
    if not pp:
        return None
    task = ctx.task
    GROUPS, SHORT, note = task.group_names, task.short, task.shared_role_note()
    lines = ["The paper's construction (SPEC §2.5, §3.4): each group's top candidates by path-patching score"
             + (f" ({note})" if note else "") + ", pruned by minimality's significance rule; the pruned circuit is what "
             "the later sections use.", ""]
    rows = []
    for j, d in pp:
        md = ctx.result("minimality", member=j.member)
        sizes = "/".join(str(len(d.circuit.get(g, []))) for g in GROUPS)
        pruned = ("/".join(str(md.groups.get(g, {}).get("kept", 0)) for g in GROUPS)
                  + f" ({md.mode}, threshold {md.threshold})") if md else "not pruned"
        rows.append([d.model] + [", ".join(f"({a},{b})" for a, b in d.circuit.get(g, [])[:6]) for g in GROUPS]
                    + [f"{sizes} → {pruned}"])
    lines += [markdown(["model"] + [f"{SHORT[g]} (top heads)" for g in GROUPS] + ["candidates → pruned"], rows)]
    for _, d in pp:
        lines += [f"`{d.model}`: " + " ".join(f"![{g}]({ctx.rel(d.dir)}/heatmaps/{g}.png)" for g in GROUPS), ""]
    findings = []
    paths = {m: ctx.circuit_path(m) for m in MEMBERS}
    if all(paths.values()):
        base_c, ft_c = load_circuit(paths["base"]), load_circuit(paths["finetuned"])
        ov = overlap(base_c, ft_c)
        lines += ["Overlap of the two circuits, both directions (shared heads per group over each circuit's size):", "",
                  markdown(["group", "shared", "of the base circuit (kept by the fine-tune)",
                            "of the fine-tuned circuit (already in the base)"],
                           [[SHORT.get(g, g), str(v["shared"]), f"{v['shared']}/{v['size_a']} ({fmt(v['precision'], 2)})",
                             f"{v['shared']}/{v['size_b']} ({fmt(v['recall'], 2)})"] for g, v in ov.items()])]
        shared = sum(v["shared"] for v in ov.values())
        kept = ", ".join(f"{SHORT.get(g, g)} {v['shared']}/{v['size_a']}" for g, v in ov.items())
        had = ", ".join(f"{SHORT.get(g, g)} {v['shared']}/{v['size_b']}" for g, v in ov.items())
        findings.append(f"**Overlap.** The fine-tune keeps {shared} of the base circuit's "
                        f"{sum(v['size_a'] for v in ov.values())} heads ({kept}); {shared} of the fine-tuned circuit's "
                        f"{sum(v['size_b'] for v in ov.values())} heads were already in the base circuit ({had}).")
    return Section("Circuits found by path patching", lines, findings)
