"""report.md for a study: every step's typed results turned into tables and figures, with a short reading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etk.circuits import GROUPS, SHORT
from etk.runners.collect import accuracy_table, dcm_table, faithfulness_matrix, markdown, write_table


def _docs(root: Path, step: str) -> list[dict[str, Any]]:
    out = []
    for p in sorted((root / step).glob("*/results.json")):
        d = json.loads(p.read_text())
        d["_dir"] = p.parent
        out.append(d)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_report(root: Path, cfg, ov: dict, log: list[str]) -> Path:
    base, ft = cfg.pair.base.name, cfg.pair.finetuned.name
    lines = [f"# Entity-tracking study: `{base}` → `{ft}` (pair `{cfg.pair.name}`)", "",
             f"{cfg.data.n_boxes}-box prompts, paper template, objects from `{cfg.data.objects}`. Every number below "
             "comes from a `results.json` in this folder; figures are PNGs beside them.", ""]
    headline: list[str] = []

    acc = _docs(root, "accuracy")
    if acc:
        header, rows = accuracy_table(acc)
        lines += ["## 1. Task accuracy (95% Wilson CI)", "", markdown(header, rows)]
        a = {d["model"]: d["accuracy"] for d in acc}
        if base in a and ft in a:
            headline.append(f"Fine-tuning moves {cfg.data.n_boxes}-box accuracy from {a[base]:.3f} (`{base}`) to "
                            f"{a[ft]:.3f} (`{ft}`).")

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
        by = {(d["circuit"], d["model"]): d for d in fa}
        f = by.get(("base_circuit", ft), {}).get("faithfulness")
        if f is not None and f == f:  # not NaN (NaN when the model's accuracy is 0)
            headline.append(f"The base model's circuit recovers {f:.2f} of the fine-tuned model's accuracy "
                            f"({'it explains most of it' if f >= 0.8 else 'only part of it'}).")

    dc = _docs(root, "dcm")
    if dc:
        header, rows = dcm_table(dc)
        lines += ["## 4. DCM: what each group's heads encode", "",
                  "Heads selected (mask rounded to 0) / group size; test accuracy of patching them; the unpatched model's "
                  "accuracy on the same targets is the chance floor.", "", markdown(header, rows)]

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
        lines += ["## 5. Activation patching of the DCM heads (mean ± sd over resampled sources)", "", markdown(header, rows)]

    cm = _docs(root, "cmap")
    if cm:
        lines += ["## 6. Cross-model activation patching", ""]
        for d in cm:
            lines += [f"**{d['direction']}**: heads of the fine-tuned circuit patched from `{d['source_model']}` into "
                      f"`{d['target_model']}`.", "", (d["_dir"] / "cmap_table.md").read_text()]
            if d["direction"] == "forward":
                r = d["results"]
                lo, hi = r["target_alone"]["accuracy"], r["source_alone"]["accuracy"]
                gains = {g: r[g]["accuracy"] for g in GROUPS if g in r}
                if gains and hi != lo:
                    best = max(gains, key=gains.get)
                    rec = (gains[best] - lo) / (hi - lo)
                    headline.append(f"Patching the fine-tuned model's {SHORT[best]} heads into the base model recovers "
                                    f"{rec:.0%} of the accuracy gap ({lo:.3f} → {gains[best]:.3f}, fine-tuned {hi:.3f}); "
                                    "the gain comes mostly from there.")

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

    lines[4:4] = ["## Headline", ""] + [f"- {h}" for h in headline] + [""] if headline else []
    lines += ["## Run log", ""] + [f"- {x}" for x in log] + [""]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out
