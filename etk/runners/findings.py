"""The study's reading: each step's typed results turned into one sentence that answers the paper's questions
(does the fine-tuned model use the base circuit? what do its groups encode? where does the gain come from?).

Every judgement is made on 95% intervals, never on point estimates alone; a finding that the data cannot support
says so instead of guessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from etk.circuits import GROUPS, SHORT
from etk.metrics import fmt
from etk.runners.collect import with_ci

Doc = dict[str, Any]
DES_SHORT = {"object_value": "object value", "positional": "position", "box_label_value": "box-label value"}


def differ(a: Doc, b: Doc) -> bool:
    """True when two accuracies' 95% intervals do not overlap."""
    return a["ci_high"] < b["ci_low"] or b["ci_high"] < a["ci_low"]


def accuracy_finding(acc: dict[str, Doc], base: str, ft: str, n_boxes: int) -> str | None:
    if base not in acc or ft not in acc:
        return None
    a, b = acc[base], acc[ft]
    verdict = (f"a significant change of {b['accuracy'] - a['accuracy']:+.3f}" if differ(a, b)
               else "no significant change: the intervals overlap")
    return f"**Accuracy.** Fine-tuning takes {n_boxes}-box accuracy from {with_ci(a)} (`{base}`) to {with_ci(b)} (`{ft}`), {verdict}."


def circuit_findings(fa: dict[tuple[str, str], Doc], ov: dict[str, Doc], ft: str, ft_sizes: dict[str, int]) -> list[str]:
    out = []
    own, borrowed = fa.get(("finetuned_circuit", ft)), fa.get(("base_circuit", ft))
    if own and own["faithfulness"] is None:  # F(model) = 0
        out.append(f"**Circuit reuse.** Undefined: `{ft}` answers no prompt correctly, so faithfulness (a ratio to its "
                   "accuracy) is not defined.")
    elif own and borrowed and borrowed["faithfulness"] is not None:
        rb, ro = borrowed["random"], own["random"]
        reuse = ("explains the fine-tuned model as well as its own circuit does (intervals overlap)"
                 if borrowed["ci_low"] <= own["ci_high"] and own["ci_low"] <= borrowed["ci_high"]
                 else "explains less of it than the fine-tuned model's own circuit"
                 if borrowed["ci_high"] < own["ci_low"] else "explains more of it than its own circuit")
        above = ("well above" if rb.get("ci_high") is not None and borrowed["ci_low"] > rb["ci_high"]
                 else "not clearly above")
        out.append(f"**Circuit reuse.** On the fine-tuned model, the base model's circuit has faithfulness "
                   f"{borrowed['faithfulness']:.2f} [{borrowed['ci_low']:.2f}, {borrowed['ci_high']:.2f}] ({above} random "
                   f"circuits of the same sizes, {fmt(rb['faithfulness_mean'], 2)}); the fine-tuned model's own circuit has "
                   f"{own['faithfulness']:.2f} [{own['ci_low']:.2f}, {own['ci_high']:.2f}] (random {fmt(ro['faithfulness_mean'], 2)}). "
                   f"The base circuit {reuse}" + (f"; keeping every head at the three positions gives "
                   f"{own['ceiling']['faithfulness']:.2f} on `{ft}`" if (own.get("ceiling") or {}).get("faithfulness") is not None
                   else "") + ".")
        if max(own["faithfulness"], borrowed["faithfulness"]) < 0.5:
            out.append("**Caveat.** Both circuits keep under half of the model's accuracy when everything else is "
                       "mean-ablated: at these sizes the mechanism is more distributed than the circuit's heads "
                       "(raise `method.path_patching.n_examples` or the circuit sizes before reading group-level "
                       "results as the whole mechanism).")
    if ov:
        shared = sum(v["shared"] for v in ov.values())
        total = sum(ft_sizes.values())
        per = ", ".join(f"{SHORT[g]} {v['shared']}/{ft_sizes.get(g, 0)}" for g, v in ov.items())
        out.append(f"**Overlap.** {shared} of the fine-tuned circuit's {total} heads are also in the base circuit ({per}).")
    return out


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


def activation_findings(ap: list[Doc], base: str) -> list[str]:
    """The fine-tuned circuit's DCM heads patched inside the base model: same heads, same information?"""
    rows = [d for d in ap if d["model"] == base and Path(d.get("_dir", "finetuned-")).name.startswith("finetuned-")]
    if not rows:
        return []
    parts = []
    for d in rows:
        s = d["accuracy_percent"]
        parts.append(f"{SHORT.get(d['group'], d['group'])} {DES_SHORT.get(d['desideratum'], d['desideratum'])} "
                     f"{s['selected_heads']['mean']:.0f}% (random {s['random_heads']['mean']:.0f}%, floor "
                     f"{s['unpatched_floor']['mean']:.0f}%)")
    return [f"**Same heads, same information.** The fine-tuned model's DCM heads patched inside `{base}`: " + "; ".join(parts) + "."]


def _share(v: Doc) -> str:
    sh = v.get("share_of_gap") or {}
    if sh.get("share") is None:
        return "n/a"
    return f"{sh['share']:.0%} [{sh['ci_low']:.0%}, {sh['ci_high']:.0%}]"


def functionality_findings(dc: list[Doc], ap: list[Doc], base: str) -> list[str]:
    """Which functionalities changed: each fine-tuned DCM head set's test accuracy in the fine-tuned model against
    the same heads patched (same desideratum) inside the base model; judged on the two 95% intervals."""
    rows = []
    for d in dc:
        if not d.get("n_selected"):
            continue
        match = next((a for a in ap if a["model"] == base and a["group"] == d["group"]
                      and a["desideratum"] == d["desideratum"] and a["heads"] == d["selected_heads"]), None)
        if not match or "pooled" not in match["accuracy_percent"]["selected_heads"]:
            continue
        ft_acc, base_acc = d["test"], match["accuracy_percent"]["selected_heads"]["pooled"]
        verdict = ("stronger after fine-tuning" if ft_acc["ci_low"] > base_acc["ci_high"] else
                   "weaker after fine-tuning" if ft_acc["ci_high"] < base_acc["ci_low"] else "unchanged")
        rows.append(f"{SHORT.get(d['group'], d['group'])} {DES_SHORT.get(d['desideratum'], d['desideratum'])} "
                    f"{with_ci(ft_acc)} vs {with_ci(base_acc)} in `{base}`: {verdict}")
    if not rows:
        return []
    return ["**Which functionalities changed.** The fine-tuned model's DCM heads, patched for their desideratum in the "
            "fine-tuned model (DCM test) and in the base model: " + "; ".join(rows) + "."]


def cmap_findings(cm: list[Doc], qualifier: str | None = None) -> list[str]:
    """Forward CMAP: the share of the fine-tuned model's gain that each group's heads carry into the base model (with
    paired-bootstrap intervals); reverse: how much of the gain the base model's heads take away."""
    out = []
    tail = f" ({qualifier})" if qualifier else ""
    for d in cm:
        r = d["results"]
        src, tgt = r["source_alone"], r["target_alone"]
        groups = {g: r[g] for g in [*GROUPS, "all"] if g in r}
        if not groups:
            continue
        if d["direction"] == "forward":
            if not differ(src, tgt):
                moved = [SHORT.get(g, g) for g, v in groups.items() if differ(v, tgt)]
                out.append(f"**CMAP.** `{d['source_model']}` and `{d['target_model']}` are equally accurate "
                           f"({src['accuracy']:.3f} vs {tgt['accuracy']:.3f}): there is no gain to locate. Patching the "
                           "fine-tuned heads into the base model " + (f"changes accuracy significantly for {', '.join(moved)}"
                           if moved else "leaves accuracy unchanged for every group: the two models' head outputs are "
                           "interchangeable (compatible representations)") + ".")
                continue
            per = {g: v for g, v in groups.items() if g != "all" and (v.get("share_of_gap") or {}).get("share") is not None}
            order = sorted(per, key=lambda g: -per[g]["share_of_gap"]["share"])
            parts = ", ".join(f"{SHORT[g]} {_share(per[g])}" for g in order)
            allg = groups.get("all", {}).get("share_of_gap") or {}
            if allg.get("share") is None:
                verdict = ""
            elif allg["ci_high"] < 0.5:
                verdict = (f" All circuit heads together recover only {_share(groups['all'])}: most of the gain is not in "
                           "these heads' outputs (it lies in other heads, other positions or the MLPs).")
            elif allg["ci_low"] <= 0:
                verdict = f" All circuit heads together recover {_share(groups['all'])}: no measurable share of the gain."
            else:
                top = order[0] if order else None
                verdict = (f" All circuit heads together recover {_share(groups['all'])} of the gain"
                           + (f"; the {SHORT[top]} heads carry the largest share ({_share(per[top])})" if top else "") + ".")
            out.append(f"**Where the gain comes from (CMAP).** Fine-tuning moves accuracy {tgt['accuracy']:.3f} → "
                       f"{src['accuracy']:.3f}; patching the fine-tuned model's heads into the base model recovers, per "
                       f"group: {parts}.{verdict}{tail}")
        else:
            drops = {g: v for g, v in groups.items() if differ(v, tgt)}
            shares = ", ".join(f"{SHORT.get(g, g)} {v['accuracy']:.3f} ({_share(v)} of the way to `{d['source_model']}`)"
                               for g, v in drops.items())
            out.append(f"**Reverse CMAP.** Giving `{d['target_model']}` ({tgt['accuracy']:.3f}) the base model's head "
                       f"outputs: " + (shares if drops else "no group changes it significantly") + ".")
    return out


def knockout_findings(ko: list[Doc], tol: float = 0.1) -> list[str]:
    """Per edge, the first start layer from which knocking it out costs less than `tol` accuracy: information
    along that edge is moved before that layer."""
    out = []
    for edge in ("last->correct_object", "last->query_label", "query_label->prev_query_label"):
        parts = []
        for d in ko:
            c = d["edges"].get(edge)
            if not c:
                continue
            base = d["baseline"]["accuracy"]
            hurt = [s for s, a in zip(c["start_layer"], c["accuracy"]) if a < base - tol]
            if base < 3 * tol:
                parts.append(f"`{d['model']}`: baseline {base:.2f} is too low for a drop to show")
            elif not hurt:
                parts.append(f"`{d['model']}`: never needed")
            else:
                after = [s for s in c["start_layer"] if s > max(hurt)]
                worst = min(c["accuracy"])
                parts.append(f"`{d['model']}`: needed up to layer {max(hurt)}"
                             + (f", free from layer {after[0]}" if after else "") + f" (worst {worst:.2f} vs {base:.2f})")
        if parts:
            out.append(f"**Knockout {edge}.** " + "; ".join(parts) + ".")
    return out


def explains(doc: Doc | None) -> str | None:
    """'circuit explains F [lo, hi]; three-position ceiling C' for a faithfulness document."""
    if not doc or doc.get("faithfulness") is None:
        return None
    c = (doc.get("ceiling") or {}).get("faithfulness")
    return (f"circuit explains {doc['faithfulness']:.2f} [{fmt(doc['ci_low'], 2)}, {fmt(doc['ci_high'], 2)}]"
            + (f"; three-position ceiling {c:.2f}" if c is not None else ""))


def answer_finding(acc: dict[str, Doc], cm: list[Doc], base: str, ft: str, qualifier: str | None) -> str | None:
    """The paper's question in one sentence: how much of the fine-tuning gain the circuit's heads carry, and which
    group carries most of it — or that the gain is not in the heads."""
    fwd = next((d for d in cm if d["direction"] == "forward"), None)
    if base not in acc or ft not in acc or fwd is None:
        return None
    a, b = acc[base], acc[ft]
    if not differ(a, b):
        return (f"**Answer.** Fine-tuning does not change tracking significantly ({with_ci(a)} → {with_ci(b)}), so there "
                "is no gain to locate.")
    r = fwd["results"]
    allg = (r.get("all") or {}).get("share_of_gap") or {}
    per = {g: r[g]["share_of_gap"] for g in GROUPS if g in r and (r[g].get("share_of_gap") or {}).get("share") is not None}
    if allg.get("share") is None or not per:
        return None
    top = max(per, key=lambda g: per[g]["share"])
    share = f"{allg['share']:.0%} [{allg['ci_low']:.0%}, {allg['ci_high']:.0%}]"
    gain = f"{b['accuracy'] - a['accuracy']:+.2f} ({a['accuracy']:.2f} → {b['accuracy']:.2f})"
    if allg["ci_high"] < 0.5:
        body = (f"patching the fine-tuned circuit's heads into the base model recovers only {share} of it: the gain is "
                "mostly not in these heads' outputs (other heads, other positions or the MLPs)")
    else:
        body = (f"patching the fine-tuned circuit's heads into the base model recovers {share} of it, most of it "
                f"through the {SHORT[top]} heads ({per[top]['share']:.0%} [{per[top]['ci_low']:.0%}, "
                f"{per[top]['ci_high']:.0%}] alone)")
    return f"**Answer.** Fine-tuning raises 7-box accuracy by {gain}; {body}" + (f" ({qualifier})." if qualifier else ".")


def quality_findings(base: str, ft: str, fa: dict[str, Doc], curves: dict[str, Doc], search: dict[str, Doc]) -> list[str]:
    """How much of each model the circuits explain, so that every later circuit claim can be read against it."""
    out = []
    for member, name in (("base", base), ("finetuned", ft)):
        own = fa.get(f"{member}_circuit-on-{member}")
        parts = []
        if own and own.get("faithfulness") is not None:
            c = own["ceiling"]["faithfulness"]
            parts.append(f"the paper-style circuit ({sum(own['heads_per_role'].values())} head-positions) keeps "
                         f"{own['faithfulness']:.2f} [{fmt(own['ci_low'], 2)}, {fmt(own['ci_high'], 2)}] of its accuracy; keeping "
                         f"every head at the paper's three positions keeps {fmt(c, 2)} (the ceiling)"
                         + (", so much of the mechanism runs through other positions" if c is not None and c < 0.6 else ""))
        cv = curves.get(name)
        if cv and cv.get("cpr") is not None:
            best = max(cv["points"], key=lambda p: p["faithfulness"] or 0)
            parts.append(f"top-x% circuits reach {fmt(best['faithfulness'], 2)} at {100 * best['fraction']:g}% of the heads "
                         f"(CPR {cv['cpr']:.2f}, CMD {cv['cmd']:.2f})")
        sr = search.get(name)
        if sr and sr.get("faithfulness") is not None:
            roles = sorted(sr["heads_per_role"].items(), key=lambda kv: -kv[1])
            parts.append(f"a position-aware circuit of {sr['units_kept']} (head, position) units ({100 * sr['unit_fraction']:.1f}% "
                         f"of them) keeps {sr['faithfulness']:.2f} [{fmt(sr['ci_low'], 2)}, {fmt(sr['ci_high'], 2)}] on held-out "
                         "prompts, with most heads at " + ", ".join(f"{r} ({k})" for r, k in roles[:4]))
        if parts:
            out.append(f"**How much the circuits explain, `{name}`.** " + "; ".join(parts) + ".")
    ov = (search.get(base) or {}).get("_overlap")
    if ov:
        shared = sum(v["shared"] for v in ov.values())
        a, b = sum(v["size_a"] for v in ov.values()), sum(v["size_b"] for v in ov.values())
        out.append(f"**Position-aware circuits compared.** {shared} units are shared between `{base}` ({a} units) and "
                   f"`{ft}` ({b} units).")
    return out
