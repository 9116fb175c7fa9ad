"""Report section of `eval`: the accuracy table and whether fine-tuning changed accuracy significantly."""

from __future__ import annotations

from pathlib import Path

from etk.report.context import ReportContext, Section
from etk.report.findings import differ
from etk.report.tables import markdown, with_ci, write_table
from etk.results import EvalResult


def accuracy_table(results: list[EvalResult]) -> tuple[list[str], list[list[str]]]:
    """Rows = models, columns = box counts (entity tracking) or accuracy and the logit difference; cells 'acc [lo, hi]'."""
    if results and not any(d.by_n_boxes for d in results):
        header = ["model", "accuracy", "logit difference"]
        return header, [[d.model, with_ci(d), with_ci(d.logit_diff, "mean") if d.logit_diff else ""] for d in results]
    counts = sorted({r["n_boxes"] for d in results for r in d.by_n_boxes})
    header = ["model"] + [f"{n} boxes" for n in counts]
    rows = []
    for d in results:
        by = {r["n_boxes"]: r for r in d.by_n_boxes}
        rows.append([d.model] + [with_ci(by[n]) if n in by else "" for n in counts])
    return header, rows


def accuracy_finding(a: EvalResult | None, b: EvalResult | None, accuracy_phrase: str) -> str | None:
    if a is None or b is None:
        return None
    verdict = (f"a significant change of {b.accuracy - a.accuracy:+.3f}" if differ(a, b)
               else "no significant change: the intervals overlap")
    return (f"**Accuracy.** Fine-tuning takes {accuracy_phrase} from {with_ci(a)} (`{a.model}`) to {with_ci(b)} "
            f"(`{b.model}`), {verdict}.")


def section(ctx: ReportContext) -> Section | None:
    acc = ctx.of("eval")
    if not acc:
        return None
    finding = accuracy_finding(ctx.result("eval", member="base"), ctx.result("eval", member="finetuned"),
                               ctx.task.accuracy_phrase(ctx.cfg.data))
    return Section("Task accuracy (95% Wilson CI)", [markdown(*accuracy_table(acc))], [finding] if finding else [])


def collect(results: list[EvalResult], out_dir: Path) -> str:
    """The multirun's accuracy table (models x box counts)."""
    return write_table(out_dir, "accuracy_table", *accuracy_table(results))
