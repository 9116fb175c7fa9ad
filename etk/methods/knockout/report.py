"""Report section of `knockout`: accuracy by start layer for each edge, and the layer range each edge is needed in."""

from __future__ import annotations

from etk.report.context import ReportContext, Section
from etk.report.tables import markdown
from etk.results import KnockoutResult


def knockout_findings(ko: list[KnockoutResult], tol: float = 0.1) -> list[str]:
    """Per edge, the first start layer from which knocking it out costs less than `tol` accuracy: information
    along that edge is moved before that layer. Every edge but the random controls, in the runs' order."""
    out = []
    edges = dict.fromkeys(e for d in ko for e in d.edges if not e.endswith("->random"))
    for edge in edges:
        parts = []
        for d in ko:
            c = d.edges.get(edge)
            if not c:
                continue
            base = d.baseline["accuracy"]
            hurt = [s for s, a in zip(c["start_layer"], c["accuracy"]) if a < base - tol]
            if base < 3 * tol:
                parts.append(f"`{d.model}`: baseline {base:.2f} is too low for a drop to show")
            elif not hurt:
                parts.append(f"`{d.model}`: never needed")
            else:
                after = [s for s in c["start_layer"] if s > max(hurt)]
                worst = min(c["accuracy"])
                parts.append(f"`{d.model}`: needed up to layer {max(hurt)}"
                             + (f", free from layer {after[0]}" if after else "") + f" (worst {worst:.2f} vs {base:.2f})")
        if parts:
            out.append(f"**Knockout {edge}.** " + "; ".join(parts) + ".")
    return out


def _table(ctx: ReportContext, d: KnockoutResult) -> list[str]:
    starts = next(iter(d.edges.values()))["start_layer"]
    rows = [[e] + [f"{a:.2f}" for a in c["accuracy"]] for e, c in d.edges.items()]
    return [f"`{d.model}` (baseline {d.baseline['accuracy']:.3f}):", "",
            markdown(["edge"] + [f"s={s}" for s in starts], rows), f"![knockout]({ctx.rel(d.dir)}/knockout.png)", ""]


def section(ctx: ReportContext) -> Section | None:
    ko = ctx.of("knockout")
    return Section("Attention knockout (edges blocked in all heads of layers ≥ s)",
                   [line for d in ko for line in _table(ctx, d)], knockout_findings(ko)) if ko else None
