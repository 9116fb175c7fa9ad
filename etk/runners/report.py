"""report.md for a study: every step's typed results turned into tables and figures, with a short reading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etk.circuits import GROUPS, SHORT
from etk.runners.collect import accuracy_table, dcm_table, faithfulness_matrix, markdown, write_table
from etk.runners.findings import (accuracy_finding, activation_findings, circuit_findings, cmap_findings, dcm_findings,
                                  knockout_findings)


def _docs(root: Path, step: str) -> list[dict[str, Any]]:
    out = []
    for p in sorted((root / step).glob("*/results.json")):
        d = json.loads(p.read_text())
        d["_dir"] = p.parent
        out.append(d)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


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
    if pp:
        lines += ["## 2. Circuits found by path patching", ""]
        header = ["model"] + [f"{SHORT[g]} (top heads)" for g in GROUPS]
        rows = [[d["model"]] + [", ".join(f"({a},{b})" for a, b in d["circuit"].get(g, [])[:6]) for g in GROUPS] for d in pp]
        lines += [markdown(header, rows)]
        for d in pp:
            rel = d["_dir"].relative_to(root)
            lines += [f"`{d['model']}`: " + " ".join(f"![{g}]({rel}/heatmaps/{g}.png)" for g in GROUPS), ""]
        if ov:
            lines += ["Overlap of the two circuits (base ∩ fine-tuned):", "",
                      markdown(["group", "shared", "precision", "recall"],
                               [[SHORT[g], str(v["shared"]), f"{v['precision']:.2f}", f"{v['recall']:.2f}"] for g, v in ov.items()])]

    fa = _docs(root, "faithfulness")
    if fa:
        for d in fa:
            d["circuit"] = d["_dir"].name.split("-on-")[0]
        header, rows, circuits, models, values = faithfulness_matrix(fa)
        write_table(root, "faithfulness_matrix", header, rows)
        lines += ["## 3. Faithfulness under mean ablation (circuit × model)", "",
                  "F(circuit)/F(model) with paired-bootstrap 95% CI; random circuits of the same sizes in parentheses.", "",
                  markdown(header, rows)]
        headline += circuit_findings({(d["circuit"], d["model"]): d for d in fa}, ov, ft, ft_sizes or {})

    dc = _docs(root, "dcm")
    if dc:
        header, rows = dcm_table(dc)
        lines += ["## 4. DCM: what each group's heads encode", "",
                  "Heads selected (mask rounded to 0) / group size; test accuracy of patching them; the unpatched model's "
                  "accuracy on the same targets is the chance floor.", "", markdown(header, rows)]
        headline += dcm_findings(dc)

    ap = _docs(root, "activation_patching")
    if dc and not ap:
        lines += ["## 5. Activation patching of the DCM heads", "",
                  "No DCM run selected any head, so there is nothing to patch (see section 4).", ""]
    if ap:
        header = ["DCM heads", "patched in", "selected heads %", "random heads %", "unpatched floor %"]
        rows = []
        for d in ap:
            s = d["accuracy_percent"]
            rows.append([d["_dir"].name.split("-in-")[0], d["model"], f"{s['selected_heads']['mean']:.1f} ± {s['selected_heads']['sd']:.1f}",
                         f"{s['random_heads']['mean']:.1f} ± {s['random_heads']['sd']:.1f}",
                         f"{s['unpatched_floor']['mean']:.1f} ± {s['unpatched_floor']['sd']:.1f}"])
        lines += ["## 5. Activation patching of the DCM heads (mean ± sd over resampled sources)", "",
                  "The fine-tuned circuit's DCM head sets patched (fully, binary) inside each model: do the same heads "
                  "carry the same information there? A random head set of the same size and the unpatched model give "
                  "the floors.", "", markdown(header, rows)]
        headline += activation_findings(ap, base)

    cm = _docs(root, "cmap")
    if cm:
        lines += ["## 6. Cross-model activation patching", ""]
        for d in cm:
            lines += [f"**{d['direction']}**: heads of the fine-tuned circuit patched from `{d['source_model']}` into "
                      f"`{d['target_model']}`.", "", (d["_dir"] / "cmap_table.md").read_text()]
        headline += cmap_findings(cm)

    ko = _docs(root, "knockout")
    if ko:
        lines += ["## 7. Attention knockout (edges blocked in all heads of layers ≥ s)", ""]
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
    out.write_text("\n".join(lines))
    return out
