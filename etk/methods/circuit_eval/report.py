"""Report sections of the circuit methods: the cross-model faithfulness matrix (`faithfulness`), how much of each
model its circuits explain (`faithfulness_curve`: ceilings, the paper circuit, curves) and the position-aware
circuits (`circuit_search`), with their findings; every later circuit claim is read against these."""

from __future__ import annotations

import json
from typing import Any

from etk.circuits import load_circuit, overlap
from etk.data.roles import MEMBERS, ROLE_VOCAB
from etk.metrics import fmt
from etk.report.context import ReportContext, Section
from etk.report.findings import Doc, above, differ
from etk.report.tables import markdown, with_ci, write_table



def faithfulness_cell(d: dict[str, Any]) -> str:
    """'F [lo, hi] (random r; ceiling c, x of it)': the circuit, its baseline and the three-position ceiling."""
    c = d.get("ceiling")
    ceil = f"; ceiling {fmt(c['faithfulness'], 2)}, {fmt(d.get('relative_to_ceiling'), 2)} of it" if c else ""
    return f"{with_ci(d, 'faithfulness')} (random {fmt(d['random']['faithfulness_mean'])}{ceil})"


def faithfulness_matrix(docs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str], list[str], list[list[float]]]:
    """Rows = circuits, columns = evaluated models; cells 'F [lo, hi] (...)' (model accuracy in the first row)."""
    circuits = sorted({d["circuit"] for d in docs})
    models = sorted({d["model"] for d in docs})
    by = {(d["circuit"], d["model"]): d for d in docs}
    header = ["circuit \\ model"] + models
    acc_row = ["model accuracy"] + [next((f"{d['accuracy_model']:.3f}" for d in docs if d["model"] == m), "") for m in models]
    rows, values = [acc_row], []
    for c in circuits:
        row, vals = [c], []
        for m in models:
            d = by.get((c, m))
            row.append(faithfulness_cell(d) if d else "")
            vals.append(d["faithfulness"] if d and d["faithfulness"] is not None else float("nan"))
        rows.append(row)
        values.append(vals)
    return header, rows, circuits, models, values


def reuse_findings(ctx: ReportContext) -> list[str]:
    """Does the base circuit explain the fine-tuned model as well as that model's own circuit?"""
    own, borrowed, ft = ctx.job("faithfulness", "finetuned_circuit-on-finetuned"), ctx.job(
        "faithfulness", "base_circuit-on-finetuned"), ctx.ft
    if own and own["faithfulness"] is None:  # F(model) = 0
        return [f"**Circuit reuse.** Undefined: `{ft}` answers no prompt correctly, so faithfulness (a ratio to its "
                "accuracy) is not defined."]
    if not (own and borrowed and borrowed["faithfulness"] is not None):
        return []
    rb, ro = borrowed["random"], own["random"]
    reuse = ("explains the fine-tuned model as well as its own circuit does (intervals overlap)"
             if not differ(borrowed, own)
             else "explains less of it than the fine-tuned model's own circuit"
             if above(own, borrowed) else "explains more of it than its own circuit")
    above_random = "well above" if above(borrowed, rb) else "not clearly above"
    ceil = (own.get("ceiling") or {}).get("faithfulness")
    out = [f"**Circuit reuse.** On the fine-tuned model, the base model's circuit has faithfulness "
           f"{borrowed['faithfulness']:.2f} [{borrowed['ci_low']:.2f}, {borrowed['ci_high']:.2f}] ({above_random} random "
           f"circuits of the same sizes, {fmt(rb['faithfulness_mean'], 2)}); the fine-tuned model's own circuit has "
           f"{own['faithfulness']:.2f} [{own['ci_low']:.2f}, {own['ci_high']:.2f}] (random {fmt(ro['faithfulness_mean'], 2)}). "
           f"The base circuit {reuse}" + (f"; keeping every head at the three positions gives {ceil:.2f} on `{ft}`"
                                          if ceil is not None else "") + "."]
    if max(own["faithfulness"], borrowed["faithfulness"]) < 0.5:
        out.append("**Caveat.** Both circuits keep under half of the model's accuracy when everything else is "
                   "mean-ablated: at these sizes the mechanism is more distributed than the circuit's heads "
                   "(raise `method.path_patching.n_examples` or the circuit sizes before reading group-level "
                   "results as the whole mechanism).")
    return out


def faithfulness_section(ctx: ReportContext) -> Section | None:
    fa = ctx.docs("faithfulness")
    if not fa:
        return None
    for d in fa:
        d["circuit"] = d["_dir"].name.split("-on-")[0]
    header, rows, _, _, _ = faithfulness_matrix(fa)
    write_table(ctx.root, "faithfulness_matrix", header, rows)
    return Section("Faithfulness under mean ablation (circuit × model)",
                   ["F(circuit)/F(model) with paired-bootstrap 95% CI; in parentheses random circuits of the same sizes, "
                    "the three-position ceiling on that model and the share of it the circuit reaches.", "",
                    markdown(header, rows)], reuse_findings(ctx))


def _curves(ctx: ReportContext) -> dict[str, Doc]:
    return {d["model"]: json.loads((d["_dir"] / "curve.json").read_text()) for d in ctx.docs("faithfulness_curve")
            if (d["_dir"] / "curve.json").exists()}


def quality_section(ctx: ReportContext) -> Section | None:
    """How much of each model its circuits explain: ceiling, the paper circuit, the curves on one plot."""
    from etk.report.plots import curve_plot

    curves = _curves(ctx)
    if not curves:
        return None
    lines = ["Mean ablation as in SPEC §3.1. *Ceiling*: every head kept at the paper's three positions (last, query "
             "label, the queried box's label) and every other position mean-ablated: about the most a circuit of the "
             "paper's form can explain (a subset can do a little better by dropping heads that hurt under ablation). "
             "*Paper circuit*: the model's own pruned circuit. *Curve*: each group's top-x% heads (CPR = area under the "
             "curve, CMD = area between it and 1, MIB's measures).", ""]
    rows, findings = [], []
    for member, name in zip(MEMBERS, (ctx.base, ctx.ft)):
        own, cv = ctx.job("faithfulness", f"{member}_circuit-on-{member}"), curves.get(name)
        ref = own or cv or {}
        rows.append([f"`{name}`", fmt(ref.get("accuracy_model")), fmt((ref.get("ceiling") or {}).get("faithfulness"), 2),
                     with_ci(own, "faithfulness") if own else "", fmt(own.get("relative_to_ceiling"), 2) if own else "",
                     f"{fmt(cv['cpr'], 2)} / {fmt(cv['cmd'], 2)}" if cv else ""])
        parts = []
        if own and own.get("faithfulness") is not None:
            c = own["ceiling"]["faithfulness"]
            parts.append(f"the paper-style circuit ({sum(own['heads_per_role'].values())} head-positions) keeps "
                         f"{own['faithfulness']:.2f} [{fmt(own['ci_low'], 2)}, {fmt(own['ci_high'], 2)}] of its accuracy; "
                         f"keeping every head at the paper's three positions keeps {fmt(c, 2)} (the ceiling)"
                         + (", so much of the mechanism runs through other positions" if c is not None and c < 0.6 else ""))
        if cv and cv.get("cpr") is not None:
            best = max(cv["points"], key=lambda p: p["faithfulness"] or 0)
            parts.append(f"top-x% circuits reach {fmt(best['faithfulness'], 2)} at {100 * best['fraction']:g}% of the "
                         f"heads (CPR {cv['cpr']:.2f}, CMD {cv['cmd']:.2f})")
        if parts:
            findings.append(f"**How much the circuits explain, `{name}`.** " + "; ".join(parts) + ".")
    lines += [markdown(["model", "accuracy", "ceiling F", "paper circuit F [95% CI]", "of ceiling", "curve CPR / CMD"], rows)]
    curve_plot(curves, ctx.root / "curves.png", "faithfulness vs circuit size")
    lines += ["![faithfulness curves](curves.png)", ""]
    return Section("Circuit quality: how much of each model its circuits explain", lines, findings)


def search_section(ctx: ReportContext) -> Section | None:
    """The position-aware circuit of each model, its roles, and its overlap per role between the members."""
    search = {d["model"]: d for d in ctx.docs("circuit_search")}
    if not search:
        return None
    lines = ["Units (head, position role) at every token role of the prompt, grown to a target faithfulness on a search "
             "split; faithfulness on held-out prompts, with the three-position ceiling on the same prompts.", ""]
    rows, findings = [], []
    for name, d in search.items():
        f = with_ci(d, "faithfulness") if d.get("ci_low") is not None else fmt(d.get("faithfulness"))
        units = (f"{d['units_kept']} of {d['units_total']} ({100 * d['unit_fraction']:.1f}%)"
                 if d.get("unit_fraction") is not None else "")
        rows.append([f"`{name}`", f, fmt((d.get("ceiling") or {}).get("faithfulness"), 2), units])
        if d.get("faithfulness") is not None:
            roles = sorted(d["heads_per_role"].items(), key=lambda kv: -kv[1])
            findings.append(f"**Position-aware circuit, `{name}`.** {d['units_kept']} (head, position) units "
                            f"({100 * d['unit_fraction']:.1f}% of them) keep {d['faithfulness']:.2f} [{fmt(d['ci_low'], 2)}, "
                            f"{fmt(d['ci_high'], 2)}] on held-out prompts (three-position ceiling "
                            f"{fmt(d['ceiling']['faithfulness'], 2)}), with most heads at "
                            + ", ".join(f"{r} ({k})" for r, k in roles[:4]) + ".")
    lines += [markdown(["model", "held-out F [95% CI]", "three-position ceiling", "units kept"], rows)]
    roles = sorted({r for d in search.values() for r in d.get("heads_per_role", {})}, key=ROLE_VOCAB.index)
    lines += ["Heads kept per position role:", "",
              markdown(["role"] + [f"`{m}`" for m in search],
                       [[r] + [str(d.get("heads_per_role", {}).get(r, 0)) for d in search.values()] for r in roles])]
    paths = {m: search[m]["_dir"] / "circuit.json" for m in (ctx.base, ctx.ft) if m in search}
    if len(paths) == 2 and all(p.exists() for p in paths.values()):
        ov = overlap(load_circuit(paths[ctx.base]), load_circuit(paths[ctx.ft]))
        lines += [f"Overlap per role (`{ctx.base}` ∩ `{ctx.ft}`):", "",
                  markdown(["role", "shared", f"`{ctx.base}`", f"`{ctx.ft}`"],
                           [[r, str(v["shared"]), str(v["size_a"]), str(v["size_b"])] for r, v in ov.items()])]
        findings.append(f"**Position-aware circuits compared.** {sum(v['shared'] for v in ov.values())} units are shared "
                        f"between `{ctx.base}` ({sum(v['size_a'] for v in ov.values())} units) and `{ctx.ft}` "
                        f"({sum(v['size_b'] for v in ov.values())} units).")
    for m, d in search.items():
        if (d["_dir"] / "circuit.png").exists():
            lines += [f"`{m}`: ![position-aware circuit]({ctx.rel(d['_dir'])}/circuit.png)", ""]
    return Section("Position-aware circuits", lines, findings)
