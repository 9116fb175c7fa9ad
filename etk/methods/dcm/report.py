"""Report section of `dcm`: what each group's heads encode, judged against the unpatched floor."""

from __future__ import annotations

from pathlib import Path

from etk.report.context import ReportContext, Section
from etk.report.tables import markdown, with_ci, write_table
from etk.results import DCMResult
from etk.tasks import task_of


def dcm_table(results: list[DCMResult]) -> tuple[list[str], list[list[str]]]:
    """SPEC §4.4's table: heads selected / group size and test accuracy, per model x group x desideratum."""
    header = ["model", "group", "desideratum", "selected / group", "test accuracy [95% CI]", "unpatched floor"]
    rows = []
    groups = task_of(results[0].config).group_names if results else ()
    order = {g: i for i, g in enumerate(groups)}  # the task's circuit order (VF, PT, PD, SR); unknown groups last
    for d in sorted(results, key=lambda d: (d.model, order.get(d.group, len(order)), d.group, d.desideratum)):
        pct = 100 * d.n_selected / max(1, d.group_size)
        rows.append([d.model, d.group, d.desideratum, f"{d.n_selected}/{d.group_size} ({pct:.0f}%)",
                     with_ci(d.test), f"{d.chance_floor_unpatched['accuracy']:.3f}"])
    return header, rows


def encodes(d: DCMResult) -> bool:
    """The selected heads beat the unpatched floor: the test interval lies above the floor."""
    return bool(d.n_selected) and d.test["ci_low"] > d.chance_floor_unpatched["accuracy"]


def dcm_findings(dc: list[DCMResult]) -> list[str]:
    """Per group: the desiderata whose selected heads beat the unpatched floor (test interval above it)."""
    out = []
    task = task_of(dc[0].config) if dc else task_of(None)
    for g in task.group_names:
        runs = [d for d in dc if d.group == g]
        if not runs:
            continue
        wins = [d for d in runs if encodes(d)]
        if wins:
            parts = [f"{task.desideratum_short(d.desideratum)} ({d.n_selected}/{d.group_size} heads, "
                     f"{d.test['accuracy']:.2f} vs floor {d.chance_floor_unpatched['accuracy']:.2f})"
                     for d in sorted(wins, key=lambda d: -d.test["accuracy"])]
            out.append(f"**DCM, {task.short[g]}.** Heads encode " + "; ".join(parts) + ".")
        else:
            out.append(f"**DCM, {task.short[g]}.** No desideratum tested is encoded above its floor by a selected head set.")
    return out


def section(ctx: ReportContext) -> Section | None:
    dc = ctx.of("dcm", part=None)
    if not dc:
        return None
    q = ctx.qualifier()
    return Section("DCM: what each group's heads encode",
                   ["Heads selected (mask rounded to 0) / group size; test accuracy of patching them; the unpatched "
                    "model's accuracy on the same targets is the chance floor.", "", markdown(*dcm_table(dc))],
                   [f"{x} ({q})" if q else x for x in dcm_findings(dc)])


def collect(results: list[DCMResult], out_dir: Path) -> str:
    """The multirun's DCM table (SPEC §4.4)."""
    return write_table(out_dir, "dcm_table", *dcm_table(results))
