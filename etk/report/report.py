"""report.md for a study: each step's report section (from the method registry), numbered in step order, with the
findings first — opening with the one-sentence answer to the paper's question."""

from __future__ import annotations

from pathlib import Path

from etk.artifacts import write_text
from etk.report.context import ReportContext
from etk.report.findings import answer_finding


def write_report(root: Path, cfg, steps: list[str], log: list[str]) -> Path:
    from etk.methods.registry import get

    ctx = ReportContext(Path(root), cfg, list(steps))
    sections = [s for s in (get(step).section()(ctx) for step in steps if get(step).section()) if s]
    findings = [f for s in sections for f in s.findings]
    answer = answer_finding({d["model"]: d for d in ctx.docs("eval")}, ctx.docs("cmap"), ctx.base, ctx.ft,
                            ctx.qualifier())
    if answer:
        findings.insert(0, answer)
    lines = [f"# Entity-tracking study: `{ctx.base}` → `{ctx.ft}` (pair `{cfg.pair.name}`)", "",
             f"{cfg.data.n_boxes}-box prompts, paper template, objects from `{cfg.data.objects}`. Every number below "
             "comes from a `results.json` in this folder; figures are PNGs beside them.", ""]
    if findings:
        lines += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    for i, s in enumerate(sections, 1):
        lines += [f"## {i}. {s.title}", ""] + s.lines + ([""] if s.lines and s.lines[-1] else [])
    lines += ["## Run log", ""] + [f"- {x}" for x in log] + [""]
    return write_text(Path(root) / "report.md", "\n".join(lines))
