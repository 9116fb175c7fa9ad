"""Report section of `model_diff`: per circuit group, how much its heads changed beside the share of the gain they
carry (CMAP), the most-changed heads against the circuit, and the logit lens / token KL of both members."""

from __future__ import annotations

from etk.report.context import ReportContext, Section
from etk.report.tables import markdown
from etk.results import ModelDiffResult
from etk.tasks import task_of


def _share(r: dict) -> str:
    s = r.get("cmap_share_of_gap") or {}
    if s.get("share") is None:
        return "—"
    return f"{100 * s['share']:.0f}% [{100 * s['ci_low']:.0f}, {100 * s['ci_high']:.0f}]"


def diff_findings(d: ModelDiffResult) -> list[str]:
    """One sentence: do the heads that changed most carry the gain?"""
    rows, v, top = d.by_group or [], d.verdict or {}, d.top_changed or {}
    task = task_of(d.config)
    SHORT = task.short
    if not rows:
        return [f"**What fine-tuning changed.** Token KL at `last` {d.token_kl['last']:.4f} (no circuit to rank)."]
    changed, gain = v.get("most_changed_group"), v.get("largest_gain_group")
    parts = [f"the group whose heads' outputs changed most at their position is {SHORT[changed]} "
             f"({next(r for r in rows if r['group'] == changed)['activation_percentile']:.0f}th percentile of all heads)"]
    if gain:
        parts.append(f"the group carrying the largest share of the gain (CMAP) is {SHORT[gain]}: "
                     + ("the heads that changed most are the ones that carry the gain" if gain == changed else
                        "the largest change and the largest gain are in different groups, so how much a head changed "
                        "does not tell where the gain is"))
    rho = v.get("rho_activation_vs_gain")
    if rho is not None:
        parts.append(f"rank correlation over groups of z change and share of the gain {rho:+.2f} ({len(task.groups)} groups: indicative only)")
    if top.get("enrichment") is not None:
        parts.append(f"{top['in_circuit']} of the {top['k']} heads whose z changed most at `last` are {'/'.join(SHORT[g] for g in task.groups_at('last'))} circuit heads "
                     f"({top['enrichment']:.1f}x chance)")
    return ["**What fine-tuning changed (model diffing).** " + "; ".join(parts) + "."]


def section(ctx: ReportContext) -> Section | None:
    docs = ctx.of("model_diff")
    if not docs:
        return None
    lines, findings = [], []
    for d in docs:
        rows = [[task_of(d.config).short[r["group"]], str(r["n_heads"]), f"`{r['role']}`",
                 f"{r['weight_delta']:.4f} ({r['weight_percentile']:.0f})",
                 f"{r['activation_delta']:.3f} ({r['activation_percentile']:.0f})",
                 f"{r['dla_change']:.3f} ({r['dla_percentile']:.0f})", _share(r)] for r in d.by_group or []]
        lens = d.logit_lens["kl_to_final"]
        half = len(lens["base"]["values"]) // 2
        lines += [f"`{d.base_model}` → `{d.finetuned_model}` on {d.n} prompts"
                  + (" (LoRA deltas from the adapter)" if d.adapter_toggled else "") + ". Per circuit group: mean "
                  "change of its heads (percentile among all heads):", "",
                  markdown(["group", "heads", "position", "weights ‖ΔW‖/‖W‖", "z ‖Δz‖/‖z‖", "|ΔDLA|", "CMAP share of gain"],
                           rows) if rows else "(no circuit)", "",
                  f"Next-token KL(fine-tuned ‖ base) at `last` {d.token_kl['last']:.4f}; logit-lens KL to the final "
                  f"output at layer {half}: base {lens['base']['values'][half]:.2f}, fine-tuned "
                  f"{lens['finetuned']['values'][half]:.2f}.", ""]
        lines += [f"![{h}]({ctx.rel(d.dir)}/{h})" for h in d.heatmaps if "activation_delta_last" in h
                  or "weight_delta" in h or "dla_diff" in h] + [""]
        findings += diff_findings(d)
    return Section("Model diffing: what changed, beside where the gain is", lines, findings)
