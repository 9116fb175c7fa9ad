"""report.md for a study: every step's typed results turned into tables and figures, with a short reading."""

from __future__ import annotations

from etk.artifacts import write_text

import json
from pathlib import Path
from typing import Any

from etk.circuits import GROUPS, SHORT, load_circuit, overlap
from etk.metrics import fmt
from etk.data.roles import ROLE_VOCAB
from etk.runners.collect import accuracy_table, dcm_table, faithfulness_matrix, markdown, with_ci, write_table
from etk.runners.findings import (accuracy_finding, activation_findings, circuit_findings, cmap_findings, dcm_findings,
                                  answer_finding, explains, functionality_findings, knockout_findings, quality_findings)


def _docs(root: Path, step: str) -> list[dict[str, Any]]:
    out = []
    for p in sorted((root / step).glob("*/results.json")):
        d = json.loads(p.read_text())
        d["_dir"] = p.parent
        out.append(d)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def circuit_quality(root: Path, base: str, ft: str) -> tuple[list[str], list[str]] | None:
    """Section 3: how much of each model its circuits explain — the three-position ceiling, the paper-style
    circuit, the faithfulness curves (one plot), the position-aware circuit and its overlap per role."""
    from etk.plots import curve_plot

    fa = {d["_dir"].name: d for d in _docs(root, "faithfulness")}
    curves = {d["model"]: json.loads((d["_dir"] / "curve.json").read_text()) for d in _docs(root, "curve")
              if (d["_dir"] / "curve.json").exists()}
    search = {d["model"]: d for d in _docs(root, "circuit_search")}
    if not (fa or curves or search):
        return None
    lines = ["## 3. Circuit quality: how much of each model its circuits explain", "",
             "Mean ablation as in SPEC §3.1. *Ceiling*: every head kept at the paper's three positions (last, query "
             "label, the queried box's label) and every other position mean-ablated: about the most a circuit of "
             "the paper's form can explain (a subset can do a little better by dropping heads that hurt under "
             "ablation). *Paper circuit*: the model's own pruned circuit. *Curve*: each group's top-x% "
             "heads (CPR = area under the curve, CMD = area between it and 1, MIB's measures). *Position-aware*: "
             "units (head, position role) at every token role, grown to a target on a search split; faithfulness on "
             "held-out prompts.", ""]
    header = ["model", "accuracy", "ceiling F", "paper circuit F [95% CI]", "of ceiling", "curve CPR / CMD",
              "position-aware F [95% CI]", "units kept"]
    rows = []
    for member, name in (("base", base), ("finetuned", ft)):
        own = fa.get(f"{member}_circuit-on-{member}")
        cv, sr = curves.get(name), search.get(name)
        ceiling = (own or cv or sr or {}).get("ceiling") or {}
        acc = (own or cv or sr or {}).get("accuracy_model")
        rows.append([f"`{name}`", fmt(acc), fmt(ceiling.get("faithfulness"), 2),
                     with_ci(own, "faithfulness") if own else "", fmt(own.get("relative_to_ceiling"), 2) if own else "",
                     f"{fmt(cv['cpr'], 2)} / {fmt(cv['cmd'], 2)}" if cv else "",
                     with_ci(sr, "faithfulness") if sr and sr.get("ci_low") is not None else (fmt(sr.get("faithfulness")) if sr else ""),
                     f"{sr['units_kept']} of {sr['units_total']} ({100 * sr['unit_fraction']:.1f}%)"
                     if sr and sr.get("unit_fraction") is not None else ""])
    lines += [markdown(header, rows)]
    if curves:
        curve_plot(curves, root / "curves.png", "faithfulness vs circuit size")
        lines += ["![faithfulness curves](curves.png)", ""]
    if search:
        roles = sorted({r for d in search.values() for r in d.get("heads_per_role", {})},
                       key=lambda r: ROLE_VOCAB.index(r))
        lines += ["Position-aware circuits, heads kept per position role:", "",
                  markdown(["role"] + [f"`{m}`" for m in search], [[r] + [str(d.get("heads_per_role", {}).get(r, 0))
                                                                         for d in search.values()] for r in roles])]
        paths = {m: d["_dir"] / "circuit.json" for m, d in search.items()}
        if base in paths and ft in paths and all(p.exists() for p in paths.values()):
            ov = overlap(load_circuit(paths[base]), load_circuit(paths[ft]))
            lines += [f"Overlap per role (`{base}` ∩ `{ft}`):", "",
                      markdown(["role", "shared", f"`{base}`", f"`{ft}`"],
                               [[r, str(v["shared"]), str(v["size_a"]), str(v["size_b"])] for r, v in ov.items()])]
            search[base]["_overlap"] = ov
        for m, d in search.items():
            if (d["_dir"] / "circuit.png").exists():
                lines += [f"`{m}`: ![position-aware circuit]({d['_dir'].relative_to(root)}/circuit.png)", ""]
    return lines, quality_findings(base, ft, fa, curves, search)


def write_report(root: Path, cfg, ov: dict, log: list[str], ft_sizes: dict[str, int] | None = None) -> Path:
    base, ft = cfg.pair.base.name, cfg.pair.finetuned.name
    lines = [f"# Entity-tracking study: `{base}` → `{ft}` (pair `{cfg.pair.name}`)", "",
             f"{cfg.data.n_boxes}-box prompts, paper template, objects from `{cfg.data.objects}`. Every number below "
             "comes from a `results.json` in this folder; figures are PNGs beside them.", ""]
    headline: list[str] = []

    acc = _docs(root, "accuracy")
    if acc:
        header, rows = accuracy_table(acc)
        lines += ["## 1. Task accuracy (95% Wilson CI)", "", markdown(header, rows)]
        headline += [f for f in [accuracy_finding({d["model"]: d for d in acc}, base, ft, cfg.data.n_boxes)] if f]

    pp = _docs(root, "path_patching")
    mini = {d["model"]: d for d in _docs(root, "minimality")}
    if pp:
        lines += ["## 2. Circuits found by path patching", "",
                  "The paper's construction (SPEC §2.5, §3.4): each group's top candidates by path-patching score (PT "
                  "candidates removed from VF), pruned by minimality's significance rule; the pruned circuit is what the "
                  "later sections use.", ""]
        header = ["model"] + [f"{SHORT[g]} (top heads)" for g in GROUPS] + ["candidates → pruned"]
        rows = []
        for d in pp:
            md = mini.get(d["model"])
            sizes = "/".join(str(len(d["circuit"].get(g, []))) for g in GROUPS)
            pruned = ("/".join(str(md["groups"].get(g, {}).get("kept", 0)) for g in GROUPS)
                      + f" ({md['mode']}, threshold {md['threshold']})") if md else "not pruned"
            rows.append([d["model"]] + [", ".join(f"({a},{b})" for a, b in d["circuit"].get(g, [])[:6]) for g in GROUPS]
                        + [f"{sizes} → {pruned}"])
        lines += [markdown(header, rows)]
        for d in pp:
            rel = d["_dir"].relative_to(root)
            lines += [f"`{d['model']}`: " + " ".join(f"![{g}]({rel}/heatmaps/{g}.png)" for g in GROUPS), ""]
        if ov:
            lines += ["Overlap of the two circuits (base ∩ fine-tuned):", "",
                      markdown(["group", "shared", "precision", "recall"],
                               [[SHORT[g], str(v["shared"]), fmt(v["precision"], 2), fmt(v["recall"], 2)] for g, v in ov.items()])]

    own_ft = next((d for d in _docs(root, "faithfulness") if d["_dir"].name == "finetuned_circuit-on-finetuned"), None)
    qualifier = (f"fine-tuned {explains(own_ft)}" if explains(own_ft) else None)
    quality = circuit_quality(root, base, ft)
    if quality:
        q_lines, q_findings = quality
        lines += q_lines
        headline += q_findings

    fa = _docs(root, "faithfulness")
    if fa:
        for d in fa:
            d["circuit"] = d["_dir"].name.split("-on-")[0]
        header, rows, circuits, models, values = faithfulness_matrix(fa)
        write_table(root, "faithfulness_matrix", header, rows)
        lines += ["## 4. Faithfulness under mean ablation (circuit × model)", "",
                  "F(circuit)/F(model) with paired-bootstrap 95% CI; in parentheses random circuits of the same sizes, "
                  "the three-position ceiling on that model and the share of it the circuit reaches.", "",
                  markdown(header, rows)]
        headline += circuit_findings({(d["circuit"], d["model"]): d for d in fa}, ov, ft, ft_sizes or {})

    dc = _docs(root, "dcm")
    if dc:
        header, rows = dcm_table(dc)
        lines += ["## 5. DCM: what each group's heads encode", "",
                  "Heads selected (mask rounded to 0) / group size; test accuracy of patching them; the unpatched model's "
                  "accuracy on the same targets is the chance floor.", "", markdown(header, rows)]
        headline += [f"{x} ({qualifier})" if qualifier else x for x in dcm_findings(dc)]

    ap = _docs(root, "activation_patching")
    if dc and not ap:
        lines += ["## 6. Activation patching of the DCM heads", "",
                  "No DCM run selected any head, so there is nothing to patch (see section 5).", ""]
    if ap:
        header = ["DCM heads", "patched in", "selected heads %", "random heads %", "unpatched floor %"]
        rows = []
        for d in ap:
            s = d["accuracy_percent"]
            rows.append([d["_dir"].name.split("-in-")[0], d["model"], f"{s['selected_heads']['mean']:.1f} ± {s['selected_heads']['sd']:.1f}",
                         f"{s['random_heads']['mean']:.1f} ± {s['random_heads']['sd']:.1f}",
                         f"{s['unpatched_floor']['mean']:.1f} ± {s['unpatched_floor']['sd']:.1f}"])
        lines += ["## 6. Activation patching of the DCM heads (mean ± sd over resampled sources)", "",
                  "The fine-tuned circuit's DCM head sets patched (fully, binary) inside each model: do the same heads "
                  "carry the same information there? A random head set of the same size and the unpatched model give "
                  "the floors.", "", markdown(header, rows)]
        headline += activation_findings(ap, base)
        headline += functionality_findings(dc, ap, base)

    cm = _docs(root, "cmap")
    if cm:
        lines += ["## 7. Cross-model activation patching", ""]
        for d in cm:
            lines += [f"**{d['direction']}**: heads of the fine-tuned circuit patched from `{d['source_model']}` into "
                      f"`{d['target_model']}`.", "", (d["_dir"] / "cmap_table.md").read_text()]
        headline += cmap_findings(cm, qualifier)
        answer = answer_finding({d["model"]: d for d in acc}, cm, base, ft, qualifier)
        if answer:
            headline.insert(0, answer)

    ko = _docs(root, "knockout")
    if ko:
        lines += ["## 8. Attention knockout (edges blocked in all heads of layers ≥ s)", ""]
        for d in ko:
            rel = d["_dir"].relative_to(root)
            starts = next(iter(d["edges"].values()))["start_layer"]
            header = ["edge"] + [f"s={s}" for s in starts]
            rows = [[e] + [f"{a:.2f}" for a in c["accuracy"]] for e, c in d["edges"].items()]
            lines += [f"`{d['model']}` (baseline {d['baseline']['accuracy']:.3f}):", "", markdown(header, rows),
                      f"![knockout]({rel}/knockout.png)", ""]
        headline += knockout_findings(ko)

    if headline:
        lines[4:4] = ["## Findings", ""] + [f"- {h}" for h in headline] + [""]
    lines += ["## Run log", ""] + [f"- {x}" for x in log] + [""]
    out = root / "report.md"
    write_text(out, "\n".join(lines))
    return out
