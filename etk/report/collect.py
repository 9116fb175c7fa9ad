"""Collect results of many runs (a Hydra multirun, or any folders) into tables: CSV + Markdown, printed.

Used as a Hydra callback (`on_multirun_end`) and as `python -m etk.report.collect <dir> [...]`."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from etk.report.tables import find_results, write_table


def collect_eval(roots: list[Path], out_dir: Path) -> str | None:
    from etk.methods.eval.report import accuracy_table

    docs = find_results(roots, "etk.eval/v1")
    return write_table(out_dir, "accuracy_table", *accuracy_table(docs)) if docs else None


def collect_faithfulness(roots: list[Path], out_dir: Path) -> str | None:
    from etk.methods.circuit_eval.report import faithfulness_matrix
    from etk.report.plots import matrix_heatmap

    docs = find_results(roots, "etk.faithfulness/v1")
    if not docs:
        return None
    header, rows, circuits, models, values = faithfulness_matrix(docs)
    md = write_table(out_dir, "faithfulness_matrix", header, rows)
    matrix_heatmap(values, circuits, models, out_dir / "faithfulness_matrix.png", "faithfulness: circuit (row) on model (column)")
    return md


def collect_dcm(roots: list[Path], out_dir: Path) -> str | None:
    from etk.methods.dcm.report import dcm_table

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
        raise SystemExit("usage: python -m etk.report.collect <run or sweep dir> [...]")
    roots = [Path(a) for a in args]
    found = [md for md in (fn(roots, roots[0]) for _, fn in COLLECTORS) if md]
    print("\n".join(found) if found else f"no etk results under {args}")


if __name__ == "__main__":
    main()
