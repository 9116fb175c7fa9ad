"""Markdown/CSV tables and the 'value [lo, hi]' cell every report section uses."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from etk.artifacts import write_text
from etk.metrics import fmt


def with_ci(d: dict[str, Any], key: str = "accuracy") -> str:
    """'value [ci_low, ci_high]' of a result with a 95% interval (`n/a` where undefined)."""
    return f"{fmt(d[key])} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"


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


def find_results(roots: list[Path], schema: str) -> list[dict[str, Any]]:
    """Every results.json below the roots with this schema (each with `_path` = its folder)."""
    docs = []
    for root in roots:
        for p in sorted(Path(root).rglob("results.json")):
            doc = json.loads(p.read_text())
            if doc.get("schema") == schema:
                doc["_path"] = str(p.parent)
                docs.append(doc)
    return docs
