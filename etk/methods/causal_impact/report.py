"""Report section of `causal_impact` and of the shared/added split (the paper's first open question): the fine-tuned
circuit's heads scored in both members, and what the heads it shares with the base circuit and the heads it adds each
carry — their share of the gain (CMAP), their functionality (DCM) and how much the model needs them (completeness)."""

from __future__ import annotations

from etk.metrics import fmt
from etk.report.context import ReportContext, Section
from etk.report.findings import share_text
from etk.report.tables import markdown, with_ci
from etk.results import SPLIT_PARTS, CausalImpactResult
from etk.methods.dcm.report import encodes


def impact_rows(ci: CausalImpactResult, short: dict[str, str]) -> list[list[str]]:
    return [[short.get(g, g), *(x for part in SPLIT_PARTS for x in (str(s[part]["n"]), fmt(s[part]["finetuned_mean"]),
                                                                       fmt(s[part]["base_mean"])))]
            for g, s in ci.groups.items()]


def split_lines(ctx: ReportContext) -> tuple[list[str], list[str]]:
    """Tables and findings of the split: CMAP, DCM and completeness on the shared and on the added heads."""
    task, short = ctx.task, ctx.task.short
    lines, findings = [], []
    found = {j.part: r for j, r in ctx.results("cmap") if j.part}
    cm = {p: found[p] for p in SPLIT_PARTS if p in found}
    if cm:
        rows = [[part, short.get(g, g), with_ci(v), share_text(v)]
                for part, r in cm.items() for g, v in r.results.items() if g in (*task.group_names, "all")]
        lines += ["**CMAP by part** (forward: the part's heads of each group patched from the fine-tuned into the base "
                  "model; share of the gap with its paired-bootstrap interval):", "",
                  markdown(["part", "heads patched", "accuracy [95% CI]", "share of the gap"], rows), ""]
        parts = [f"the {p} heads {share_text(r.results['all'])}" for p, r in cm.items()
                 if ((r.results.get("all") or {}).get("share_of_gap") or {}).get("share") is not None]
        if parts:
            findings.append("**Shared vs added heads (CMAP).** Patched alone into the base model, " + " and ".join(parts)
                            + " of the fine-tuning gain.")
    dc = sorted(((j, r) for j, r in ctx.results("dcm") if j.part), key=lambda jr: SPLIT_PARTS.index(jr[0].part))
    if dc:
        rows = [[j.part, short.get(r.group, r.group), task.desideratum_short(r.desideratum),
                 f"{r.n_selected}/{r.group_size}", with_ci(r.test), fmt(r.chance_floor_unpatched["accuracy"])]
                for j, r in dc]
        lines += ["**DCM by part** (a mask over only the part's heads of the group, for the functionality the group is "
                  "known for):", "", markdown(["part", "group", "desideratum", "selected / heads", "test accuracy",
                                               "unpatched floor"], rows), ""]
        said = [f"{j.part} {short.get(r.group, r.group)} heads " + ("carry" if encodes(r) else "do not carry")
                + f" {task.desideratum_short(r.desideratum)} ({r.test['accuracy']:.2f} vs floor "
                  f"{r.chance_floor_unpatched['accuracy']:.2f})" for j, r in dc]
        findings.append("**Shared vs added heads (DCM).** " + "; ".join(said) + ".")
    comp = ctx.result("completeness", member="finetuned")
    if comp is not None and comp.named:
        said = [f"without its {k} heads ({v['size']}) the fine-tuned model keeps F(M\\K) = {fmt(v['F_M_minus_K'])} "
                f"(the circuit without them {fmt(v['F_C_minus_K'])})" for k, v in comp.named.items() if v["size"]]
        if said:
            findings.append("**Shared vs added heads (completeness).** " + "; ".join(said) + ".")
    return lines, findings


def section(ctx: ReportContext) -> Section | None:
    ci = ctx.result("causal_impact")
    split, split_findings = split_lines(ctx)
    if ci is None and not split:
        return None
    lines, findings = [], []
    if ci is not None:
        short = ctx.task.short
        lines += ["Each head of the fine-tuned circuit scored by path patching in the fine-tuned and in the base model "
                  "(more negative = more important; 0 where the head is not a base candidate), by whether the base "
                  "circuit has it in the same group (shared) or not (added): mean scores.", "",
                  markdown(["group", "shared", "mean score (ft)", "mean score (base)", "added", "mean score (ft)",
                            "mean score (base)"], impact_rows(ci, short)), ""]
        lines += [f"![causal impact]({ctx.rel(p)})" for p in ci.figure_paths()] + [""]
        said = [f"{short.get(g, g)} {s['added']['n']} heads ({fmt(s['added']['finetuned_mean'])} in the fine-tuned, "
                f"{fmt(s['added']['base_mean'])} in the base model)" for g, s in ci.groups.items() if s["added"]["n"]]
        if said:
            findings.append("**Causal impact of the added heads.** Mean path-patching score: " + "; ".join(said) + ".")
    return Section("Causal impact: the heads fine-tuning shares and adds", lines + split, findings + split_findings)
