"""Compare two study (or any) run folders value by value: every results.json below OLD against the same relative path
below NEW, recursively, and report.md without its run log. Paths are compared after replacing each root by `<root>`;
timings and resources are left out (`IGNORED`). Prints every difference and a last line
`files=<n> values=<n> differences=<n>`; exit status 1 when anything differs.

    python benchmarks/compare_results.py outputs/before outputs/after [--ignore-config] [--tol 1e-5]

`--ignore-config` leaves out each result's resolved `config` (a version that adds settings changes it, not the
results); `--tol` accepts float differences up to it (counted as `within_tol=<n>`; exact equality otherwise).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

IGNORED = {"resources", "wall_s", "seconds", "train_seconds"}  # measured times and memory, not results
TOL = {"tol": 0.0, "within": 0}  # set by --tol


def _norm(v: Any, root: str) -> Any:
    return v.replace(root, "<root>") if isinstance(v, str) else v


def compare(a: Any, b: Any, where: str, roots: tuple[str, str], out: list[str]) -> int:
    """Number of leaf values compared; differences appended to `out`."""
    if isinstance(a, dict) and isinstance(b, dict):
        n = 0
        for k in sorted(set(a) | set(b)):
            if k in IGNORED:
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'new' if k in b else 'old'}")
                continue
            n += compare(a[k], b[k], f"{where}.{k}", roots, out)
        return n
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} vs {len(b)}")
            return 1
        return sum(compare(x, y, f"{where}[{i}]", roots, out) for i, (x, y) in enumerate(zip(a, b)))
    x, y = _norm(a, roots[0]), _norm(b, roots[1])
    same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
    if not same and isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool) \
            and abs(x - y) <= TOL["tol"]:
        TOL["within"] += 1
        same = True
    if not same:
        out.append(f"{where}: {x!r} vs {y!r}")
    return 1


def report_body(path: Path) -> list[str]:
    text = path.read_text().split("## Run log")[0]
    return text.splitlines()


def main(argv: list[str]) -> int:
    if "--ignore-config" in argv:
        argv = [a for a in argv if a != "--ignore-config"]
        IGNORED.add("config")
    if "--tol" in argv:
        i = argv.index("--tol")
        TOL["tol"] = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if len(argv) != 2:
        raise SystemExit(__doc__)
    old, new = (Path(a).resolve() for a in argv)
    roots = (str(old), str(new))
    diffs: list[str] = []
    files = values = 0
    rel_old = {p.relative_to(old) for p in old.rglob("results.json")}
    rel_new = {p.relative_to(new) for p in new.rglob("results.json")}
    for rel in sorted(rel_old ^ rel_new):
        diffs.append(f"{rel}: only in {'old' if rel in rel_old else 'new'}")
    for rel in sorted(rel_old & rel_new):
        files += 1
        values += compare(json.loads((old / rel).read_text()), json.loads((new / rel).read_text()), str(rel), roots, diffs)
    for name in ("report.md",):
        if (old / name).exists() and (new / name).exists():
            files += 1
            a, b = report_body(old / name), report_body(new / name)
            values += len(a)
            for i, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    diffs.append(f"{name}:{i + 1}: {x!r} vs {y!r}")
            if len(a) != len(b):
                diffs.append(f"{name}: {len(a)} vs {len(b)} lines")
    for d in diffs:
        print(d)
    print(f"files={files} values={values} differences={len(diffs)}" + (f" within_tol={TOL['within']}" if TOL["tol"] else ""))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
