"""Markdown/CSV tables and the 'value [lo, hi]' cell every report section uses."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from etk.artifacts import write_text
from etk.metrics import fmt


def value(x: Any, key: str) -> Any:
    """`x[key]` of a record, or `x.key` of a typed result (None when absent)."""
    return x.get(key) if isinstance(x, dict) else getattr(x, key, None)


def with_ci(d: Any, key: str = "accuracy") -> str:
    """'value [ci_low, ci_high]' of a record or typed result with a 95% interval (`n/a` where undefined)."""
    return f"{fmt(value(d, key))} [{fmt(value(d, 'ci_low'))}, {fmt(value(d, 'ci_high'))}]"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, name: str, header: list[str], rows: list[list[str]]) -> str:
    """`<name>.csv` and `<name>.md` in out_dir (atomically); returns the Markdown."""
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    write_text(Path(out_dir) / f"{name}.csv", buf.getvalue())
    md = markdown(header, rows)
    write_text(Path(out_dir) / f"{name}.md", md)
    return md


def find_results(roots: list[Path], result: type) -> list[Any]:
    """Every run below the roots whose results.json has this result type's schema, loaded as that type (each with
    `.dir`)."""
    found = []
    for root in roots:
        for p in sorted(Path(root).rglob("results.json")):
            doc = json.loads(p.read_text())
            if doc.get("schema") == result.schema:
                found.append(result.from_record(doc, p))
    return found
