"""Report section of `eval`: the accuracy table and whether fine-tuning changed accuracy significantly."""

from __future__ import annotations

from typing import Any

from etk.report.context import ReportContext, Section
from etk.report.findings import Doc, differ
from etk.report.tables import markdown, with_ci


def accuracy_table(docs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows = models, columns = box counts; cells 'acc [lo, hi]'."""
    counts = sorted({r["n_boxes"] for d in docs for r in d.get("by_n_boxes", [d])})
    header = ["model"] + [f"{n} boxes" for n in counts]
    rows = []
    for d in docs:
        by = {r["n_boxes"]: r for r in d.get("by_n_boxes", [d])}
        rows.append([d["model"]] + [
            with_ci(by[n]) if n in by else "" for n in counts
        ])
    return header, rows


def accuracy_finding(acc: dict[str, Doc], base: str, ft: str, n_boxes: int) -> str | None:
    if base not in acc or ft not in acc:
        return None
    a, b = acc[base], acc[ft]
    verdict = (f"a significant change of {b['accuracy'] - a['accuracy']:+.3f}" if differ(a, b)
               else "no significant change: the intervals overlap")
    return f"**Accuracy.** Fine-tuning takes {n_boxes}-box accuracy from {with_ci(a)} (`{base}`) to {with_ci(b)} (`{ft}`), {verdict}."


def section(ctx: ReportContext) -> Section | None:
    acc = ctx.docs("eval")
    if not acc:
        return None
    finding = accuracy_finding({d["model"]: d for d in acc}, ctx.base, ctx.ft, ctx.cfg.data.n_boxes)
    return Section("Task accuracy (95% Wilson CI)", [markdown(*accuracy_table(acc))], [finding] if finding else [])
