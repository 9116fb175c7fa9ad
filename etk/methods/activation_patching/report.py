"""Report section of `activation_patching`: do the fine-tuned DCM heads carry the same information inside the base
model, and which functionalities changed."""

from __future__ import annotations

from etk.report.context import ReportContext, Section
from etk.report.findings import above, no_difference_text
from etk.report.tables import markdown, with_ci
from etk.results import ActivationPatchingResult, DCMResult, Job
from etk.tasks import task_of


def activation_findings(ap: list[tuple[Job, ActivationPatchingResult]], base: str) -> list[str]:
    """The fine-tuned circuit's DCM heads patched inside the base model: same heads, same information?"""
    rows = [d for j, d in ap if d.model == base and j.circuit_of == "finetuned" and not is_variant(d)]
    if not rows:
        return []
    parts = []
    for d in rows:
        s, task = d.accuracy_percent, task_of(d.config)
        parts.append(f"{task.short.get(d.group, d.group)} {task.desideratum_short(d.desideratum)} "
                     f"{s['selected_heads']['mean']:.0f}% (random {s['random_heads']['mean']:.0f}%, floor "
                     f"{s['unpatched_floor']['mean']:.0f}%)")
    return [f"**Same heads, same information.** The fine-tuned model's DCM heads patched inside `{base}`: " + "; ".join(parts) + "."]


def is_variant(d: ActivationPatchingResult) -> bool:
    """Patched under another desideratum than its DCM run's (`method.desideratum`, e.g. a positional variant)."""
    return bool(((d.config or {}).get("method") or {}).get("desideratum"))


def variant_findings(ap: list[tuple[Job, ActivationPatchingResult]]) -> list[str]:
    """Each head set under the variants of its desideratum: which keep the heads' effect above the random floor."""
    out = []
    for model in dict.fromkeys(d.model for _, d in ap):
        rows = [d for _, d in ap if d.model == model and is_variant(d)]
        if not rows:
            continue
        task = task_of(rows[0].config)
        parts = [f"{task.short.get(d.group, d.group)} {d.desideratum} {d.accuracy_percent['selected_heads']['mean']:.0f}% "
                 f"(random {d.accuracy_percent['random_heads']['mean']:.0f}%)" for d in rows]
        out.append(f"**Variants, in `{model}`.** The DCM heads patched with each variant's sources and targets: "
                   + "; ".join(parts) + ".")
    return out


def functionality_findings(dc: list[DCMResult], ap: list[ActivationPatchingResult], base: str) -> list[str]:
    """Which functionalities changed: each fine-tuned DCM head set's test accuracy in the fine-tuned model against
    the same heads patched (same desideratum) inside the base model; judged on the two 95% intervals."""
    rows = []
    for d in dc:
        if not d.n_selected:
            continue
        match = next((a for a in ap if a.model == base and a.group == d.group
                      and a.desideratum == d.desideratum and a.heads == d.selected_heads), None)
        if not match or "pooled" not in match.accuracy_percent["selected_heads"]:
            continue
        ft_acc, base_acc = d.test, match.accuracy_percent["selected_heads"]["pooled"]
        verdict = ("stronger after fine-tuning" if above(ft_acc, base_acc) else
                   "weaker after fine-tuning" if above(base_acc, ft_acc) else no_difference_text(ft_acc, base_acc))
        task = task_of(d.config)
        rows.append(f"{task.short.get(d.group, d.group)} {task.desideratum_short(d.desideratum)} "
                    f"{with_ci(ft_acc)} vs {with_ci(base_acc)} in `{base}`: {verdict}")
    if not rows:
        return []
    return ["**Which functionalities changed.** The fine-tuned model's DCM heads, patched for their desideratum in the "
            "fine-tuned model (DCM test) and in the base model: " + "; ".join(rows) + "."]


def section(ctx: ReportContext) -> Section | None:
    ap, dc = ctx.results("activation_patching"), ctx.of("dcm", part=None)
    if dc and not ap:
        return Section("Activation patching of the DCM heads",
                       ["No DCM run selected any head, so there is nothing to patch (see the DCM section).", ""])
    if not ap:
        return None
    rows = []
    for j, d in ap:
        s = d.accuracy_percent
        dcm_job = j.reads[0][1] if j.reads else f"{d.group}-{d.desideratum}"
        rows.append([dcm_job, d.desideratum, d.model,
                     f"{s['selected_heads']['mean']:.1f} ± {s['selected_heads']['sd']:.1f}",
                     f"{s['random_heads']['mean']:.1f} ± {s['random_heads']['sd']:.1f}",
                     f"{s['unpatched_floor']['mean']:.1f} ± {s['unpatched_floor']['sd']:.1f}"])
    lines = ["The fine-tuned circuit's DCM head sets patched (fully, binary) inside each model: do the same heads carry "
             "the same information there? A random head set of the same size and the unpatched model give the floors.",
             "", markdown(["DCM heads", "desideratum", "patched in", "selected heads %", "random heads %", "unpatched floor %"], rows)]
    return Section("Activation patching of the DCM heads (mean ± sd over resampled sources)", lines,
                   activation_findings(ap, ctx.base) + functionality_findings(dc, [d for _, d in ap], ctx.base)
                   + variant_findings(ap))
