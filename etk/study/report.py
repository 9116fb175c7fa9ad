"""report.md for a study: each step's report section (the registry's `section` of each step, reading the study's job
graph of typed results), numbered in step order, with the findings first — opening with the one-sentence answer to
the paper's question."""

from __future__ import annotations

from pathlib import Path

from etk.artifacts import write_text
from etk.methods.registry import get
from etk.report.context import ReportContext
from etk.report.findings import differ
from etk.report.tables import with_ci
from etk.results import CMAPResult, EvalResult, Job, Result
from etk.tasks import Task


def answer_finding(task: Task, data_cfg, base: EvalResult | None, ft: EvalResult | None, fwd: CMAPResult | None,
                   qualifier: str | None) -> str | None:
    """The paper's question in one sentence: how much of the fine-tuning gain the circuit's heads carry, and which
    group carries most of it — or that the gain is not in the heads."""
    if base is None or ft is None or fwd is None:
        return None
    if not differ(base, ft):
        return (f"**Answer.** Fine-tuning does not change {task.skill} significantly ({with_ci(base)} → {with_ci(ft)}), so "
                "there is no gain to locate.")
    r = fwd.results
    allg = (r.get("all") or {}).get("share_of_gap") or {}
    per = {g: r[g]["share_of_gap"] for g in task.group_names if g in r and (r[g].get("share_of_gap") or {}).get("share") is not None}
    if allg.get("share") is None or not per:
        return None
    top = max(per, key=lambda g: per[g]["share"])
    share = f"{allg['share']:.0%} [{allg['ci_low']:.0%}, {allg['ci_high']:.0%}]"
    gain = f"{ft.accuracy - base.accuracy:+.2f} ({base.accuracy:.2f} → {ft.accuracy:.2f})"
    if allg["ci_high"] < 0.5:
        body = (f"patching the fine-tuned circuit's heads into the base model recovers only {share} of it: the gain is "
                "mostly not in these heads' outputs (other heads, other positions or the MLPs)")
    else:
        body = (f"patching the fine-tuned circuit's heads into the base model recovers {share} of it, most of it "
                f"through the {task.short[top]} heads ({per[top]['share']:.0%} [{per[top]['ci_low']:.0%}, "
                f"{per[top]['ci_high']:.0%}] alone)")
    return f"**Answer.** Fine-tuning raises {task.accuracy_phrase(data_cfg)} by {gain}; {body}" + (f" ({qualifier})." if qualifier else ".")


def write_report(root: Path, cfg, steps: list[str], graph: list[tuple[Job, Result]], log: list[str]) -> Path:
    ctx = ReportContext(Path(root), cfg, list(steps), list(graph))
    sections = [s for s in (get(step).section(ctx) for step in steps if get(step).section) if s]
    findings = [f for s in sections for f in s.findings]
    answer = answer_finding(ctx.task, cfg.data, ctx.result("eval", member="base"), ctx.result("eval", member="finetuned"),
                            ctx.result("cmap", direction="forward", part=None), ctx.qualifier())
    if answer:
        findings.insert(0, answer)
    lines = [f"# {ctx.task.title}: `{ctx.base}` → `{ctx.ft}` (pair `{cfg.pair.name}`)", "",
             f"{ctx.task.prompts_description(cfg.data)} Every number below comes from a `results.json` in this "
             "folder; figures are PNGs beside them.", ""]
    if findings:
        lines += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    for i, s in enumerate(sections, 1):
        lines += [f"## {i}. {s.title}", ""] + s.lines + ([""] if s.lines and s.lines[-1] else [])
    lines += ["## Run log", ""] + [f"- {x}" for x in log] + [""]
    return write_text(Path(root) / "report.md", "\n".join(lines))
