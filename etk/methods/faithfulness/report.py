"""Report section of `faithfulness`: the cross-model faithfulness matrix (circuit x model) and whether the base
circuit explains the fine-tuned model as well as that model's own circuit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from etk.metrics import fmt
from etk.report.context import ReportContext, Section
from etk.report.findings import above, differ
from etk.report.plots import matrix_heatmap
from etk.report.tables import markdown, with_ci, write_table
from etk.results import FaithfulnessResult


def faithfulness_cell(d: FaithfulnessResult) -> str:
    """'F [lo, hi] (random r; all heads c, x of it)': the circuit, its baseline and the all-heads reference."""
    c = d.all_heads
    ceil = f"; all heads {fmt(c['faithfulness'], 2)}, {fmt(d.relative_to_all_heads, 2)} of it" if c else ""
    return f"{with_ci(d, 'faithfulness')} (random {fmt(d.random['faithfulness_mean'])}{ceil})"


def faithfulness_matrix(cells: list[tuple[str, FaithfulnessResult]]) -> tuple[list[str], list[list[str]], list[str],
                                                                             list[str], list[list[float]]]:
    """Rows = circuits, columns = evaluated models; cells 'F [lo, hi] (...)' (model accuracy in the first row).
    `cells`: (circuit label, result) pairs."""
    circuits = sorted({c for c, _ in cells})
    models = sorted({d.model for _, d in cells})
    by = {(c, d.model): d for c, d in cells}
    header = ["circuit \\ model"] + models
    acc_row = ["model accuracy"] + [next((f"{d.accuracy_model:.3f}" for _, d in cells if d.model == m), "") for m in models]
    rows, values = [acc_row], []
    for c in circuits:
        row, vals = [c], []
        for m in models:
            d = by.get((c, m))
            row.append(faithfulness_cell(d) if d else "")
            vals.append(d.faithfulness if d and d.faithfulness is not None else float("nan"))
        rows.append(row)
        values.append(vals)
    return header, rows, circuits, models, values


def reuse_findings(ctx: ReportContext) -> list[str]:
    """Does the base circuit explain the fine-tuned model as well as that model's own circuit?"""
    own = ctx.result("faithfulness", circuit_of="finetuned", member="finetuned")
    borrowed = ctx.result("faithfulness", circuit_of="base", member="finetuned")
    ft = ctx.ft
    if own and own.faithfulness is None:  # F(model) = 0
        return [f"**Circuit reuse.** Undefined: `{ft}` answers no prompt correctly, so faithfulness (a ratio to its "
                "accuracy) is not defined."]
    if not (own and borrowed and borrowed.faithfulness is not None):
        return []
    rb, ro = borrowed.random, own.random
    reuse = ("explains the fine-tuned model as well as its own circuit does (intervals overlap)"
             if not differ(borrowed, own)
             else "explains less of it than the fine-tuned model's own circuit"
             if above(own, borrowed) else "explains more of it than its own circuit")
    above_random = "well above" if above(borrowed, rb) else "not clearly above"
    ceil = (own.all_heads or {}).get("faithfulness")
    out = [f"**Circuit reuse.** On the fine-tuned model, the base model's circuit has faithfulness "
           f"{borrowed.faithfulness:.2f} [{borrowed.ci_low:.2f}, {borrowed.ci_high:.2f}] ({above_random} random "
           f"circuits of the same sizes, {fmt(rb['faithfulness_mean'], 2)}); the fine-tuned model's own circuit has "
           f"{own.faithfulness:.2f} [{own.ci_low:.2f}, {own.ci_high:.2f}] (random {fmt(ro['faithfulness_mean'], 2)}). "
           f"The base circuit {reuse}" + (f"; keeping every head at the three positions gives {ceil:.2f} on `{ft}`"
                                          if ceil is not None else "") + "."]
    if max(own.faithfulness, borrowed.faithfulness) < 0.5:
        out.append("**Caveat.** Both circuits keep under half of the model's accuracy when everything else is "
                   "mean-ablated: at these sizes the mechanism is more distributed than the circuit's heads "
                   "(raise `method.path_patching.n_examples` or the circuit sizes before reading group-level "
                   "results as the whole mechanism).")
    return out


def section(ctx: ReportContext) -> Section | None:
    fa = ctx.results("faithfulness")
    if not fa:
        return None
    header, rows, _, _, _ = faithfulness_matrix([(f"{j.circuit_of}_circuit", d) for j, d in fa])
    write_table(ctx.root, "faithfulness_matrix", header, rows)
    return Section("Faithfulness under mean ablation (circuit × model)",
                   ["F(circuit)/F(model) with paired-bootstrap 95% CI; in parentheses random circuits of the same sizes, "
                    "the all-heads reference on that model and the share of it the circuit reaches.", "",
                    markdown(header, rows)], reuse_findings(ctx))


def collect(results: list[FaithfulnessResult], out_dir: Path) -> str:
    """The multirun's faithfulness matrix (circuit x model) as a table and a heatmap."""
    header, rows, circuits, models, values = faithfulness_matrix([(d.circuit or "?", d) for d in results])
    md = write_table(out_dir, "faithfulness_matrix", header, rows)
    matrix_heatmap(values, circuits, models, Path(out_dir) / "faithfulness_matrix.png",
                   "faithfulness: circuit (row) on model (column)")
    return md


_ = Any
