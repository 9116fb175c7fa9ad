"""Collect results of many runs (a Hydra multirun, or any folders) into one table: CSV + Markdown, printed.

Used as a Hydra callback (`on_multirun_end`) and as `python -m etk.runners.collect <dir> [...]`."""

from __future__ import annotations

from etk.artifacts import write_text

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from etk.circuits import GROUPS
from etk.metrics import fmt


def find_results(roots: list[Path], schema: str) -> list[dict[str, Any]]:
    docs = []
    for root in roots:
        for p in sorted(Path(root).rglob("results.json")):
            doc = json.loads(p.read_text())
            if doc.get("schema") == schema:
                doc["_path"] = str(p.parent)
                docs.append(doc)
    return docs


def with_ci(d: dict[str, Any], key: str = "accuracy") -> str:
    """'value [ci_low, ci_high]' of a result with a 95% interval (`n/a` where undefined)."""
    return f"{fmt(d[key])} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"


def faithfulness_cell(d: dict[str, Any]) -> str:
    """'F [lo, hi] (random r; ceiling c, x of ceiling)': the circuit, its baseline and how much any
    three-position circuit could explain."""
    c = d.get("ceiling")
    ceil = f"; ceiling {fmt(c['faithfulness'], 2)}, {fmt(d.get('relative_to_ceiling'), 2)} of it" if c else ""
    return f"{with_ci(d, 'faithfulness')} (random {fmt(d['random']['faithfulness_mean'])}{ceil})"


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


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, name: str, header: list[str], rows: list[list[str]]) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    md = markdown(header, rows)
    write_text(out_dir / f"{name}.md", md)
    return md


def collect_eval(roots: list[Path], out_dir: Path) -> str | None:
    docs = find_results(roots, "etk.eval/v1")
    if not docs:
        return None
    return write_table(out_dir, "accuracy_table", *accuracy_table(docs))


def faithfulness_matrix(docs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str], list[str], list[list[float]]]:
    """Rows = circuits, columns = evaluated models; cells 'F [lo, hi]' (model accuracy in the header row)."""
    circuits = sorted({d["circuit"] for d in docs})
    models = sorted({d["model"] for d in docs})
    by = {(d["circuit"], d["model"]): d for d in docs}
    header = ["circuit \\ model"] + models
    acc_row = ["model accuracy"] + [next((f"{d['accuracy_model']:.3f}" for d in docs if d["model"] == m), "") for m in models]
    rows, values = [acc_row], []
    for c in circuits:
        row, vals = [c], []
        for m in models:
            d = by.get((c, m))
            row.append(faithfulness_cell(d) if d else "")
            vals.append(d["faithfulness"] if d and d["faithfulness"] is not None else float("nan"))
        rows.append(row)
        values.append(vals)
    return header, rows, circuits, models, values


def collect_faithfulness(roots: list[Path], out_dir: Path) -> str | None:
    docs = find_results(roots, "etk.faithfulness/v1")
    if not docs:
        return None
    header, rows, circuits, models, values = faithfulness_matrix(docs)
    md = write_table(out_dir, "faithfulness_matrix", header, rows)
    from etk.plots import matrix_heatmap

    matrix_heatmap(values, circuits, models, out_dir / "faithfulness_matrix.png", "faithfulness: circuit (row) on model (column)")
    return md


def dcm_table(docs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """SPEC §4.4's table: heads selected / group size and test accuracy, per model x group x desideratum."""
    header = ["model", "group", "desideratum", "selected / group", "test accuracy [95% CI]", "unpatched floor"]
    rows = []
    order = {g: i for i, g in enumerate(GROUPS)}  # circuit order VF, PT, PD, SR; unknown groups last
    for d in sorted(docs, key=lambda d: (d["model"], order.get(d["group"], len(order)), d["group"], d["desideratum"])):
        t, f = d["test"], d["chance_floor_unpatched"]
        pct = 100 * d["n_selected"] / max(1, d["group_size"])
        rows.append([d["model"], d["group"], d["desideratum"], f"{d['n_selected']}/{d['group_size']} ({pct:.0f}%)",
                     with_ci(t), f"{f['accuracy']:.3f}"])
    return header, rows


def collect_dcm(roots: list[Path], out_dir: Path) -> str | None:
    docs = find_results(roots, "etk.dcm/v1")
    return write_table(out_dir, "dcm_table", *dcm_table(docs)) if docs else None


COLLECTORS = (("accuracy (95% CI)", collect_eval), ("faithfulness matrix", collect_faithfulness), ("DCM", collect_dcm))


class CollectTables(Callback):
    """At the end of a multirun, write and print the tables of everything the sweep produced."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        for name, fn in COLLECTORS:
            md = fn([sweep], sweep)
            if md:
                print(f"\n[etk] {name} — {sweep}\n{md}")


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        raise SystemExit("usage: python -m etk.runners.collect <run or sweep dir> [...]")
    roots = [Path(a) for a in args]
    found = [md for md in (fn(roots, roots[0]) for _, fn in COLLECTORS) if md]
    print("\n".join(found) if found else f"no etk results under {args}")


if __name__ == "__main__":
    main()
