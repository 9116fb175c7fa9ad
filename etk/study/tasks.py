"""`method=study_tasks pair=<p> tasks=[entity_tracking,ioi]`: the study of each task (`<run dir>/<task>/`, each with
its report.md), then the specificity control (each member's circuit of one task mean-ablated on the other task,
against random heads) and report.md with an "Across tasks" section: does the fine-tune change the mechanism of a task
it was not trained on? Resumable like the study (every job whose results.json is valid is skipped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from etk.artifacts import write_text
from etk.circuits import load_circuit, overlap
from etk.data.roles import MEMBERS
from etk.errors import ConfigError
from etk.methods.registry import REGISTRY
from etk.metrics import fmt
from etk.report.findings import differ
from etk.report.tables import markdown, with_ci
from etk.results import Job, Result, member_circuit, select
from etk.runtime import compose, output_dir, to_overrides
from etk.study.run import Study, inherited_overrides
from etk.tasks import task_named


def run_study_tasks(cfg: DictConfig) -> dict[str, Any]:
    tasks = list(cfg.get("tasks") or [cfg.task.name])
    for t in tasks:
        task_named(t)  # an unknown task: a ConfigError naming the tasks, before any work
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks={tasks}: each task once")
    root = output_dir()
    base = [o for o in inherited_overrides(cfg) if not o.startswith(("task=", "task."))]
    method_overrides = [o for o in _method_overrides() if not o.startswith(("method.study_config", "method.specificity"))]
    studies: dict[str, Study] = {}
    for t in tasks:
        sub_cfg = compose("patching", [f"method={cfg.method.study_config}", f"task={t}", *base, *method_overrides])
        studies[t] = Study(sub_cfg, root / t, [f"task={t}", *base])
        studies[t].run()
    cross = Study(cfg, root, base)  # runs the specificity jobs (resumable), with their own task= override
    sizes = to_overrides("method", cfg.method.specificity) if cfg.method.get("specificity") else []
    abl = [f"ablation.n_prompts={int(cfg.method.ablation_prompts)}"]
    for a in tasks:
        for b in (x for x in tasks if x != a):
            for m in MEMBERS:
                path = member_circuit(studies[a].graph, m)
                if path is None:
                    continue
                job = Job("specificity", f"{a}_circuit-on-{b}-{m}",
                          (f"task={b}", f"model={m}", f"circuit.path={path}", *sizes, *abl), member=m, circuit_of=m)
                cross.run_job(REGISTRY["specificity"], job)
    report = write_tasks_report(root, cfg, tasks, studies, cross.graph)
    seconds = sum(s.seconds for s in studies.values()) + cross.seconds
    print(f"[etk] study_tasks of pair {cfg.pair.name} ({', '.join(tasks)}): {report} ({seconds / 60:.1f} min of jobs)")
    return {"report": str(report), "seconds": seconds}


def _method_overrides() -> list[str]:
    """The command line's `method.*` overrides (the study sizes), passed on to each task's study."""
    from etk.study.run import _task_overrides

    return [o for o in _task_overrides() if o.startswith("method.")]


def across_rows(tasks: list[str], studies: dict[str, Study]) -> tuple[list[list[str]], list[str]]:
    """One row per task: both members' accuracy, the circuits' overlap, each circuit in the other member, CMAP's share
    of the gap; and one finding per task."""
    rows, findings = [], []
    for t in tasks:
        s, task = studies[t], task_named(t)
        acc = {m: s.result("eval", member=m) for m in MEMBERS}
        paths = {m: member_circuit(s.graph, m) for m in MEMBERS}
        ov_text, shared, size_ft, size_base = "", None, None, None
        if all(paths.values()):
            ov = overlap(load_circuit(paths["base"]), load_circuit(paths["finetuned"]))
            shared = sum(v["shared"] for v in ov.values())
            size_base, size_ft = sum(v["size_a"] for v in ov.values()), sum(v["size_b"] for v in ov.values())
            ov_text = (f"{shared} shared; precision {fmt(shared / size_base if size_base else None, 2)}, recall "
                       f"{fmt(shared / size_ft if size_ft else None, 2)}")
        f_ft_on_base = s.result("faithfulness", circuit_of="finetuned", member="base")
        f_base_on_ft = s.result("faithfulness", circuit_of="base", member="finetuned")
        fwd = s.result("cmap", direction="forward", part=None)
        allg = ((fwd.results.get("all") or {}).get("share_of_gap") if fwd is not None else None) or {}
        rows.append([task.name, *(with_ci(acc[m]) if acc[m] else "" for m in MEMBERS), ov_text,
                     with_ci(f_ft_on_base, "faithfulness") if f_ft_on_base else "",
                     with_ci(f_base_on_ft, "faithfulness") if f_base_on_ft else "",
                     with_ci(allg, "share") if allg.get("share") is not None else "n/a"])
        if acc["base"] is not None and acc["finetuned"] is not None:
            change = (f"Fine-tuning changes {task.accuracy_phrase(s.cfg.data)} {acc['base'].accuracy:.2f} → "
                      f"{acc['finetuned'].accuracy:.2f} ({'significant' if differ(acc['base'], acc['finetuned']) else 'not significant'})")
            kept = (f"; {shared} of the fine-tuned circuit's {size_ft} (group, head) entries are in the base circuit"
                    if size_ft else "")
            gain = (f"; the fine-tuned circuit's heads carry {with_ci(allg, 'share')} of the gap (CMAP)"
                    if allg.get("share") is not None else "")
            findings.append(f"**{task.title.replace(' study', '')}.** {change}{kept}{gain}.")
    return rows, findings


def specificity_rows(graph: list[tuple[Job, Result]]) -> list[list[str]]:
    rows = []
    for j, r in sorted(select(graph, "specificity"), key=lambda jr: jr[0].name):
        on = r.config.get("task", {}).get("name")
        rows.append([f"{r.circuit_task} circuit of `{j.member}` ({r.n_heads} heads)", on, with_ci(r.accuracy_model),
                     with_ci(r.accuracy_ablated), f"{fmt(r.random['mean'])} [{fmt(r.random['ci_low'])}, "
                     f"{fmt(r.random['ci_high'])}]"])
    return rows


def write_tasks_report(root: Path, cfg, tasks: list[str], studies: dict[str, Study],
                       graph: list[tuple[Job, Result]]) -> Path:
    rows, findings = across_rows(tasks, studies)
    spec = specificity_rows(graph)
    lines = [f"# Across tasks: `{cfg.pair.base.name}` → `{cfg.pair.finetuned.name}` (pair `{cfg.pair.name}`)", "",
             "Each task's full study is in its folder: " + ", ".join(f"[{t}]({t}/report.md)" for t in tasks) + ". "
             "Every number below comes from a `results.json` in these folders.", "", "## Findings", ""]
    lines += [f"- {f}" for f in findings] + [""]
    lines += ["## Across tasks", "",
              "Per task: accuracy of both members (95% Wilson CI); overlap of the two members' circuits (precision = "
              "shared / base circuit, recall = shared / fine-tuned circuit); faithfulness of each member's circuit in "
              "the other member; the share of the accuracy gap that patching the fine-tuned circuit's heads into the "
              "base model recovers (forward CMAP, paired bootstrap CI).", "",
              markdown(["task", "base accuracy", "fine-tuned accuracy", "circuit overlap", "fine-tuned circuit on base",
                        "base circuit on fine-tuned", "CMAP share of the gap"], rows), ""]
    if spec:
        lines += ["## Specificity control", "",
                  "A member's circuit of one task mean-ablated at every position (means over the other task's ablation "
                  "prompts), measured on the other task, against random head sets of the same size.", "",
                  markdown(["circuit", "measured on", "intact accuracy", "circuit ablated", "random heads ablated"], spec),
                  ""]
    lines += ["## Run log", ""] + [f"- {t}: {studies[t].seconds / 60:.1f} min of jobs" for t in tasks] + [""]
    return write_text(Path(root) / "report.md", "\n".join(lines))
