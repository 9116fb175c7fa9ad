"""Collect results of many runs (a Hydra multirun, or any folders) into tables: CSV + Markdown, printed. Every
registered method with a `collect` function contributes its table, from its typed results.

Used as a Hydra callback (`on_multirun_end`) and as `python -m etk.study.collect <dir> [...]`."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from etk.methods.registry import REGISTRY
from etk.report.tables import find_results


def collect_all(roots: list[Path], out_dir: Path) -> list[tuple[str, str]]:
    """(title, Markdown table) for every method with results below the roots, tables written into out_dir."""
    out = []
    for name, spec in REGISTRY.items():
        if spec.collect is None:
            continue
        found = find_results(roots, spec.result)
        md = spec.collect(found, out_dir) if found else None
        if md:
            out.append((spec.collect_title or name, md))
    return out


class CollectTables(Callback):
    """At the end of a multirun, write and print the tables of everything the sweep produced."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        for name, md in collect_all([sweep], sweep):
            print(f"\n[etk] {name} — {sweep}\n{md}")


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        raise SystemExit("usage: python -m etk.study.collect <run or sweep dir> [...]")
    roots = [Path(a) for a in args]
    found = [md for _, md in collect_all(roots, roots[0])]
    print("\n".join(found) if found else f"no etk results under {args}")


if __name__ == "__main__":
    main()
